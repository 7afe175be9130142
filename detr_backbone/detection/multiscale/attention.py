"""Multi-scale deformable attention (Deformable DETR).

Each query attends to ``n_points`` locations per head and feature level, placed by learned offsets
around its reference point and read by bilinear interpolation; the attention weights are a
softmax over all levels and points of a head. The core that reads and sums the samples comes in
interchangeable implementations (``sampling``), chosen by ``attention_impl``; none needs a
compiled extension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .sampling import SpatialShapes, multi_scale_deformable_attention, resolve_attention_impl
from .sampling.discrete import discrete_attention


class MSDeformAttn(nn.Module):
    """Deformable-DETR's ``MSDeformAttn``, with its parameter names, so its checkpoints load.

    ``forward(query (N, Q, C), reference_points, input_flatten (N, S, C), spatial_shapes, padding_mask)``:
    ``reference_points`` is (N, Q, L, 2) points (x, y) or (N, Q, L, 4) boxes (cx, cy, w, h), in [0, 1]
    of each level's padded map. Offsets are in pixels of the level around a point, in units of
    half the box (over ``n_points``) around a box. ``padding_mask`` (N, S) is True on padding,
    whose values are zeroed so that no query reads them. ``discrete``: each point reads its nearest value
    (RT-DETRv2's deployment variant, ``sampling.discrete``) and the offsets, which then get no gradient, are frozen.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        attention_impl: str = "auto",
        discrete: bool = False,
    ):
        super().__init__()
        resolve_attention_impl(attention_impl)  # an unknown name fails here, not at the first forward
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        for name, count in (("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if count < 1:
                raise ValueError(f"{name} must be >= 1, got {count}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.attention_impl = attention_impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.discrete = discrete
        self._reset_parameters()
        self.sampling_offsets.requires_grad_(not discrete)

    def _reset_parameters(self) -> None:
        # At first every query looks the same way: head h along angle 2*pi*h/M, its points 1, 2, ...
        # steps out on the square around the reference, equally weighted; training bends the pattern.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * steps[None, None, :, None]  # (M, 1, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        batch, queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.d_model // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        locations = self.sampling_locations(reference_points, offsets, spatial_shapes)
        if self.discrete:
            sampled = discrete_attention(value, spatial_shapes, locations, weights)
        else:
            sampled = multi_scale_deformable_attention(value, spatial_shapes, locations, weights, self.attention_impl)
        return self.output_proj(sampled)

    def sampling_locations(self, reference_points: Tensor, offsets: Tensor, spatial_shapes: SpatialShapes) -> Tensor:
        """(N, Q, M, L, P, 2) locations in [0, 1] of each level from references (N, Q, L, 2 or 4) and offsets."""
        if reference_points.shape[-1] == 2:
            sizes = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=offsets.device)
            return reference_points[:, :, None, :, None, :] + offsets / sizes[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            centres, sizes = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            return centres + offsets / self.n_points * sizes * 0.5
        raise ValueError(
            f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape {tuple(reference_points.shape)}"
        )
