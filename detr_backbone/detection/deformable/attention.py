"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Each query attends to ``n_points`` locations per head and feature level, placed by learned offsets
around its reference point and read by bilinear interpolation; the attention weights are a
softmax over all levels and points of a head. No custom CUDA kernel: ``F.grid_sample`` does the
reading, so it runs on any device and under autocast, and traces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialShapes = Sequence[tuple[int, int]]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def multi_scale_deformable_attention(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Weighted sum of bilinearly sampled values: Deformable-DETR's ``ms_deform_attn_core_pytorch``.

    ``value`` (N, S, M, D): the levels' maps flattened and concatenated (S = sum of h * w over
    ``spatial_shapes``, each (h, w)), M heads of D channels. ``sampling_locations`` (N, Q, M, L, P, 2)
    as (x, y) in [0, 1] of each level's map, pixel corners at 0 and 1 (``align_corners=False``);
    outside the map reads zeros. ``attention_weights`` (N, Q, M, L, P). Returns (N, Q, M * D) in
    ``value``'s dtype.
    """
    batch, length, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if len(spatial_shapes) != levels or sum(h * w for h, w in spatial_shapes) != length:
        raise ValueError(
            f"spatial_shapes {list(spatial_shapes)} must list the {levels} levels of the sampling locations "
            f"and cover the value's {length} positions"
        )
    # Half precision cannot place a point on a map (8 significant bits in bfloat16 are a third of a
    # pixel on a 100-pixel map) and some CPU builds have no half grid_sample: sample in float32.
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    if dtype in LOW_PRECISION or value.dtype in LOW_PRECISION:
        dtype = torch.float32
    grids = 2 * sampling_locations.to(dtype) - 1  # grid_sample's [-1, 1]
    maps = value.to(dtype).split([h * w for h, w in spatial_shapes], dim=1)
    sampled = []
    for level, ((height, width), level_value) in enumerate(zip(spatial_shapes, maps)):
        # heads become batch entries: (N, h*w, M, D) -> (N*M, D, h, w), grid (N, Q, M, P, 2) -> (N*M, Q, P, 2)
        level_value = level_value.permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    output = (torch.stack(sampled, dim=-2) * weights).sum((-2, -1))  # (N*M, D, Q)
    return output.view(batch, heads * channels, queries).transpose(1, 2).to(value.dtype)


class MSDeformAttn(nn.Module):
    """Deformable-DETR's ``MSDeformAttn``, with its parameter names, so its checkpoints load.

    ``forward(query (N, Q, C), reference_points, input_flatten (N, S, C), spatial_shapes, padding_mask)``:
    ``reference_points`` is (N, Q, L, 2) points (x, y) or (N, Q, L, 4) boxes (cx, cy, w, h), in [0, 1]
    of each level's padded map. Offsets are in pixels of the level around a point, in units of
    half the box (over ``n_points``) around a box. ``padding_mask`` (N, S) is True on padding,
    whose values are zeroed so that no query reads them.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        for name, count in (("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if count < 1:
                raise ValueError(f"{name} must be >= 1, got {count}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

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
        return self.output_proj(multi_scale_deformable_attention(value, spatial_shapes, locations, weights))

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
