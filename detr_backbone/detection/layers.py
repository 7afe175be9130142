"""What the transformers of every head are made of: residual layers with a feed-forward block, positional
maps added to queries and keys, and copies of a layer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def with_position(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def clones(module: nn.Module, count: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))


class ResidualLayer(nn.Module):
    """What encoder and decoder layers share: the feed-forward block and the residual/norm wiring."""

    def __init__(self, normalize_before: bool):
        super().__init__()
        self.normalize_before = normalize_before

    def add_feedforward(self, d_model: int, dim_feedforward: int, dropout: float, activation: str) -> None:
        # called after the attentions are made, so parameters come in DETR's order (its optimizer states load)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        # a plain function, not a module: DETR's state dict has no key for it
        self.activation = ACTIVATIONS[activation]

    def feedforward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def residual(
        self, x: Tensor, norm: nn.LayerNorm, dropout: nn.Dropout, sublayer: Callable[[Tensor], Tensor]
    ) -> Tensor:
        if self.normalize_before:
            return x + dropout(sublayer(norm(x)))
        return norm(x + dropout(sublayer(x)))
