"""Optimizer parameter groups of a Joiner, chosen by module rather than by name substrings.

DETR put every parameter whose name contains "backbone" into the lr_backbone group, which
swept in the learned positional table: with lr_backbone=0 the table kept requires_grad=True
and never moved. Here the body and the positional table are separate groups with their own,
explicit learning rates; frozen parameters join no group and no group is left empty.

A timm backbone's body is grouped as timm's recipes do (``layer_decay``): norms, biases, position
embeddings and tokens without weight decay, and with ``backbone.lr_layer_decay`` one group a layer.
A ViT's feature pyramid is new (no pretrained weights), so it trains at the head's lr.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .backbones.backbone import TimmBackbone
from .backbones.layer_decay import layer_decay_groups
from .config import JoinerConfig
from .joiner import Joiner


def trainable(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [parameter for parameter in parameters if parameter.requires_grad]


def make_group(name: str, parameters: Iterable[nn.Parameter], lr: float) -> list[dict]:
    """A one-element list holding the group, or an empty list when nothing in it trains."""
    parameters = trainable(parameters)
    if parameters and lr <= 0:
        raise ValueError(f"parameter group {name!r} has {len(parameters)} trainable tensors but lr={lr}")
    return [{"name": name, "params": parameters, "lr": lr}] if parameters else []


def joiner_parameter_groups(joiner: Joiner, cfg: JoinerConfig, head_lr: float | None = None) -> list[dict]:
    """The backbone's groups and the positional table's; ``head_lr`` (default ``lr_backbone``) for a pyramid."""
    backbone, position = joiner[0], make_group("position", joiner[1].parameters(), cfg.position_lr)
    if not isinstance(backbone, TimmBackbone):
        return make_group("backbone", backbone.parameters(), cfg.lr_backbone) + position
    body = layer_decay_groups(backbone.body, cfg.lr_backbone, cfg.backbone.lr_layer_decay)
    for group in body:
        make_group(group["name"], group["params"], group["lr"])  # the check that a trained tensor has an lr
    pyramid = backbone.pyramid.parameters() if backbone.pyramid is not None else []
    return body + make_group("pyramid", pyramid, cfg.lr_backbone if head_lr is None else head_lr) + position
