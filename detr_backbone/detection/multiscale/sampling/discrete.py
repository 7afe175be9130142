"""RT-DETRv2's discrete sampling: each point reads the one value nearest to it instead of a bilinear sample.

A location x in [0, 1] of a map w pixels wide reads pixel ``int(x * w + 0.5)`` (truncated, as RT-DETRv2 casts),
clamped to the map. No ``GridSample`` is needed: the reads are one gather, which every deployment runtime
has, and the result does not depend on a runtime's interpolation. The locations get no gradient (RT-DETRv2
freezes the sampling offsets of this variant).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .shapes import SpatialShapes, check_shapes


def discrete_attention(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Weighted sum of the values nearest to each location (the arguments of ``multi_scale_deformable_attention``)."""
    check_shapes(value, spatial_shapes, sampling_locations)
    batch, _, heads, channels = value.shape
    queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    rows, start = [], 0
    for level, (height, width) in enumerate(spatial_shapes):
        x, y = sampling_locations[:, :, :, level].detach().unbind(-1)
        column = (x * width + 0.5).to(torch.int64).clamp(0, width - 1)
        row = (y * height + 0.5).to(torch.int64).clamp(0, height - 1)
        rows.append(start + row * width + column)
        start += height * width
    index = torch.stack(rows, 3).permute(0, 2, 1, 3, 4).reshape(batch, heads, -1)  # (N, M, Q * L * P)
    table = value.transpose(1, 2)  # (N, M, S, D)
    sampled = table.gather(2, index[..., None].expand(-1, -1, -1, channels))
    sampled = sampled.view(batch, heads, queries, levels * points, channels)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(batch, heads, queries, levels * points, 1)
    output = (sampled * weights.to(sampled.dtype)).sum(3)  # (N, M, Q, D)
    return output.transpose(1, 2).reshape(batch, queries, heads * channels)
