"""Optimizer parameter groups of a Joiner, chosen by module rather than by name substrings.

DETR put every parameter whose name contains "backbone" into the lr_backbone group, which
swept in the learned positional table: with lr_backbone=0 the table kept requires_grad=True
and never moved. Here the body and the positional table are separate groups with their own,
explicit learning rates; frozen parameters join no group and no group is left empty.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

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


def joiner_parameter_groups(joiner: Joiner, cfg: JoinerConfig) -> list[dict]:
    return make_group("backbone", joiner[0].parameters(), cfg.lr_backbone) + make_group(
        "position", joiner[1].parameters(), cfg.position_lr
    )
