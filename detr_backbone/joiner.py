"""The Joiner (backbone + positional encoding) and the builders that make it from a config."""

from __future__ import annotations

import inspect
from dataclasses import asdict
from typing import Any

from torch import Tensor, nn

from .backbones.backbone import BackboneBase
from .backbones.bn_folding import fold_frozen_batch_norm
from .backbones.declared_backbone import DeclaredBackbone
from .compilation import compile_in_place
from .config import CustomBackboneConfig, CustomPositionConfig, JoinerConfig
from .nested_tensor import MaskedImages, NestedTensor
from .targets import instantiate_target, resolve
from .weights import load_checkpoint

# Where NHWC measured faster on a CPU (docs/performance.md): oneDNN's convolutions gain, while
# GroupNorm's NHWC kernels lose more than the convolutions gain. A backbone of the user's own stays
# NCHW unless its config says otherwise.
CHANNELS_LAST_BY_DEFAULT = {"torchvision": True, "groupnorm": False, "timm": True, "resnet_vd": True}


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

    def forward(self, tensor_list: MaskedImages) -> tuple[list[NestedTensor], list[Tensor]]:
        features = list(self[0](tensor_list).values())
        positions = [self[1](feature).to(feature.tensors.dtype) for feature in features]
        return features, positions


def build_position_encoding(args: Any) -> nn.Module:
    """The positional encoding of a config or of DETR's args, built by its ``_target_`` with
    ``num_pos_feats = hidden_dim // 2`` features per axis."""
    cfg = JoinerConfig.from_args(args)
    position = cfg.position
    if isinstance(position, CustomPositionConfig):
        arguments = position.arguments
    else:
        accepted = inspect.signature(resolve(position._target_, "position._target_")).parameters
        arguments = {name: value for name, value in asdict(position).items() if name in accepted}
    return instantiate_target(position._target_, arguments, "position", num_pos_feats=cfg.hidden_dim // 2)


def build_backbone_network(cfg: JoinerConfig) -> BackboneBase:
    """The backbone its ``_target_`` builds: one of ours from its schema's fields, or the user's own
    from its arguments, wrapped in ``DeclaredBackbone`` unless it already is a backbone."""
    spec = cfg.backbone
    selection = {
        "train_backbone": cfg.train_backbone,
        "return_interm_layers": spec.return_interm_layers,
        "main_layer": spec.main_layer,
        "levels": spec.levels,
        "trainable_layers": spec.trainable_layers,
    }
    if isinstance(spec, CustomBackboneConfig):
        backbone = instantiate_target(spec._target_, spec.arguments, "backbone")
        if not isinstance(backbone, BackboneBase):
            backbone = DeclaredBackbone(backbone, spec._target_, **selection)
    else:
        arguments = {"name": spec.name, "dilation": spec.dilation, "pretrained": spec.pretrained, **selection}
        if spec.kwargs:
            arguments["kwargs"] = spec.kwargs
        if not spec.freeze_norm:
            arguments["freeze_norm"] = False
        backbone = instantiate_target(spec._target_, arguments, "backbone")
        if spec.fold_frozen_bn:
            fold_frozen_batch_norm(backbone.body)
    if CHANNELS_LAST_BY_DEFAULT.get(spec.kind, False) if spec.channels_last is None else spec.channels_last:
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
