"""What every attention core checks and agrees on: the levels' shapes and the dtype it samples in."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SpatialShapes = Sequence[tuple[int, int]]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_shapes(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor) -> None:
    length, levels = value.shape[1], sampling_locations.shape[3]
    if len(spatial_shapes) != levels or sum(h * w for h, w in spatial_shapes) != length:
        raise ValueError(
            f"spatial_shapes {list(spatial_shapes)} must list the {levels} levels of the sampling locations "
            f"and cover the value's {length} positions"
        )


def sampling_dtype(value: Tensor, sampling_locations: Tensor) -> torch.dtype:
    """float32 for half inputs, else the inputs' common dtype.

    Half precision cannot place a point on a map (8 significant bits in bfloat16 are a third of a
    pixel on a 100-pixel map), and some CPU builds have no half grid_sample.
    """
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    if dtype in LOW_PRECISION or value.dtype in LOW_PRECISION:
        return torch.float32
    return dtype
