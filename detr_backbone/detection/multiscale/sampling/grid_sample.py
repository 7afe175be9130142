"""The reference core: each level read by ``F.grid_sample``, the samples stacked and weighted.

It is Deformable-DETR's ``ms_deform_attn_core_pytorch`` and the fallback of every other path: it
runs on any device, under autocast, traces and exports to ONNX (``GridSample``). It keeps every
sampled value of every query, head, level and point for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .shapes import SpatialShapes, check_shapes, sampling_dtype


def grid_sample_attention(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Weighted sum of bilinearly sampled values (the arguments of ``multi_scale_deformable_attention``)."""
    check_shapes(value, spatial_shapes, sampling_locations)
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = sampling_dtype(value, sampling_locations)
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
