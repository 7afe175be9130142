"""The box head of every DETR-style detector: a few Linear layers with ReLU (or another activation) between them."""

from __future__ import annotations

import itertools

from torch import Tensor, nn

from .layers import ACTIVATIONS


class MLP(nn.Module):
    """``num_layers`` Linear layers with ``activation`` between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, activation: str = "relu"):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(dims))
        self.activation = ACTIVATIONS[activation]  # a function: no state dict key

    def forward(self, x: Tensor) -> Tensor:
        *hidden, last = self.layers
        for layer in hidden:
            x = self.activation(layer(x))
        return last(x)
