"""A DETR-family training framework on a backbone library with DETR's semantics: backbones, positional encodings
and the Joiner at the root, detectors, data, inference, training and commands in the layers above.

The package is layered, each layer importing only those listed before it, none in a circle: this backbone
library (the root modules and ``backbones``), ``detection`` (detectors and their losses), ``data``,
``inference``, ``training`` (the LightningModule, the job and its callbacks) and ``commands``.
"""

from .backbones.backbone import Backbone, BackboneBase, GroupNorm32, GroupNormBackbone, TimmBackbone, downsample_mask
from .backbones.freezing import freeze_stages, parameter_stages
from .backbones.frozen_batch_norm import FrozenBatchNorm2d
from .backbones.resnet_vd import ResNetVdBackbone
from .config import BackboneConfig, JoinerConfig, PositionConfig
from .joiner import Joiner, build_backbone, build_position_encoding
from .nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from .param_groups import joiner_parameter_groups
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .weights import CheckpointMismatchError, LoadReport, load_checkpoint, read_state_dict

__all__ = [
    "Backbone",
    "BackboneBase",
    "BackboneConfig",
    "CheckpointMismatchError",
    "FrozenBatchNorm2d",
    "GroupNorm32",
    "GroupNormBackbone",
    "Joiner",
    "JoinerConfig",
    "LoadReport",
    "NestedTensor",
    "PositionConfig",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "ResNetVdBackbone",
    "TimmBackbone",
    "build_backbone",
    "build_position_encoding",
    "downsample_mask",
    "freeze_stages",
    "joiner_parameter_groups",
    "load_checkpoint",
    "nested_tensor_from_tensor_list",
    "parameter_stages",
    "read_state_dict",
]
