"""The Joiner (backbone + positional encoding) and the builders that make it from a config."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .backbone import Backbone, BackboneBase, GroupNormBackbone, TimmBackbone
from .bn_folding import fold_frozen_batch_norm
from .compilation import compile_in_place
from .config import JoinerConfig
from .nested_tensor import NestedTensor
from .position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from .weights import load_checkpoint

# Where NHWC measured faster on a CPU (README: Performance): oneDNN's convolutions gain, while
# GroupNorm's NHWC kernels lose more than the convolutions gain.
CHANNELS_LAST_BY_DEFAULT = {"torchvision": True, "groupnorm": False, "timm": True}


class Joiner(nn.Sequential):
    """``nn.Sequential(backbone, position_embedding)``: child "0" is the backbone, "1" the encoding.

    Returns the backbone's feature maps (each a NestedTensor, shallow to deep) and, for each, its
    positional map cast to the feature map's dtype (the encodings compute in float32). ``strides``
    and ``feature_channels`` list the levels; ``num_channels`` is the backbone's (DETR's int, or
    Deformable-DETR's list when levels were chosen with ``levels``).
    """

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.feature_channels = backbone.feature_channels
        self.strides = backbone.strides

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        features = list(self[0](tensor_list).values())
        positions = [self[1](feature).to(feature.tensors.dtype) for feature in features]
        return features, positions


def build_position_encoding(args: Any) -> nn.Module:
    """The positional encoding of a config or of DETR's args; ``hidden_dim // 2`` features per axis."""
    cfg = JoinerConfig.from_args(args)
    position, num_pos_feats = cfg.position, cfg.hidden_dim // 2
    if position.kind == "learned":
        return PositionEmbeddingLearned(num_pos_feats, num_embeddings=position.num_embeddings)
    return PositionEmbeddingSine(
        num_pos_feats,
        position.temperature,
        position.normalize,
        position.scale,
        eps=position.eps,
        offset=position.offset,
        cache_size=position.cache_size,
    )


def build_backbone_network(cfg: JoinerConfig) -> BackboneBase:
    spec = cfg.backbone
    options = {
        "pretrained": spec.pretrained,
        "trainable_layers": spec.trainable_layers,
        "main_layer": spec.main_layer,
        "levels": spec.levels,
    }
    if spec.kind == "timm":
        backbone = TimmBackbone(
            spec.name, spec.return_interm_layers, train_backbone=cfg.train_backbone, dilation=spec.dilation, **options
        )
    else:
        family = GroupNormBackbone if spec.kind == "groupnorm" else Backbone
        backbone = family(spec.name, cfg.train_backbone, spec.return_interm_layers, spec.dilation, **options)
    if spec.fold_frozen_bn:
        fold_frozen_batch_norm(backbone.body)
    if CHANNELS_LAST_BY_DEFAULT[spec.kind] if spec.channels_last is None else spec.channels_last:
        backbone.use_channels_last()
    return backbone


def build_backbone(args: Any) -> Joiner:
    """The Joiner of a config (``JoinerConfig``, Hydra config, dict) or of DETR's argparse namespace."""
    cfg = JoinerConfig.from_args(args)
    joiner = Joiner(build_backbone_network(cfg), build_position_encoding(cfg))
    if cfg.backbone.checkpoint:
        load_checkpoint(joiner, cfg.backbone.checkpoint, strict=cfg.backbone.strict)
    if cfg.backbone.freeze:
        joiner.requires_grad_(False)
    if cfg.position_lr == 0:
        joiner[1].requires_grad_(False)  # a table that can never move must not claim to train
    if cfg.backbone.compile:
        compile_in_place(joiner)  # the module tree and state dict keys stay DETR's
    return joiner
