"""Where a bilinear sample reads: its four corners' rows in the flattened value, and their weights.

``F.grid_sample(align_corners=False, padding_mode="zeros")`` places location x in [0, 1] of a map
w pixels wide at pixel coordinate ``x * w - 0.5`` and reads the pixels either side, weighted by the
distance to each; a corner outside the map reads zero. Here the value of all levels, heads and
batch entries is one table of rows (N * S * M, D), so a corner is a row number and a sample is a
weighted sum of four rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .shapes import SpatialShapes


@dataclass(frozen=True)
class Corners:
    """The corners of (N, Q, M, L, P) sampling points, in the row layout of ``value.reshape(-1, D)``."""

    rows: Tensor  # (N, Q, M, L, P, 4) int: rows of the corners (y, x) = (0, 0), (0, 1), (1, 0), (1, 1)
    fraction: Tensor  # (N, Q, M, L, P, 2): the point's (x, y) past its top-left corner, in pixels
    inside: Tensor  # (N, Q, M, L, P, 2, 2) bool: the (near, far) corner's column, row (x, y) on the map
    map_size: Tensor  # (L, P, 2): each level's (w, h), the pixels per unit of sampling location

    def factors(self) -> tuple[Tensor, Tensor]:
        """The bilinear factors (1 - t, t) of the near and far corner along x and along y, (N, Q, M, L, P, 2)
        each; zero for a column or row off the map, so every corner off it weighs zero."""
        factors = torch.stack([1 - self.fraction, self.fraction], -2) * self.inside  # (..., corner, axis)
        return factors[..., 0], factors[..., 1]

    def slopes(self) -> tuple[Tensor, Tensor]:
        """The factors' derivatives (-1, 1) along x and along y, zero off the map as the factors are."""
        slope = torch.tensor([[-1], [1]], dtype=self.fraction.dtype, device=self.fraction.device)
        slopes = self.inside * slope
        return slopes[..., 0], slopes[..., 1]


def corner_products(along_y: Tensor, along_x: Tensor) -> Tensor:
    """(N, Q, M, L, P, 4): a factor along y times one along x for the corners (y, x) = (0, 0), (0, 1), (1, 0), (1, 1)."""
    return (along_y[..., :, None] * along_x[..., None, :]).flatten(-2)


@dataclass(frozen=True)
class Layout:
    """Constants of one input layout, laid out over (levels, points) so that the per-point arithmetic
    runs over contiguous inner dimensions instead of broadcasting a 2-wide one."""

    half_size: Tensor  # (L, P, 2): half of each level's (w, h)
    first_pixel: Tensor  # (L, P, 2): zeros, then -1, w - 2, w - 1 (and h's): the bounds of a corner's
    before_first: Tensor  # column and row on the map, for clamp
    before_last: Tensor
    last_pixel: Tensor
    map_size: Tensor  # (L, P, 2): w, h
    level_width: Tensor  # (L, P) int
    first_rows: Tensor  # (N, 1, M, L, P) int: the table row of each image's, level's and head's pixel (0, 0)
    steps: Tensor  # (L, P, 4) int: from the top-left corner's row to each corner's
    rows_total: int


@functools.lru_cache(maxsize=64)
def layout(spatial_shapes: tuple, points: int, batch: int, length: int, heads: int, dtype, device) -> Layout:
    index = torch.int32 if batch * length * heads < 2**31 else torch.int64  # half the memory where it fits
    with torch.inference_mode(False):  # usable by autograd when first built under inference mode
        widths = torch.tensor([w for _, w in spatial_shapes], device=device)
        map_size = torch.tensor([[w, h] for h, w in spatial_shapes], device=device, dtype=dtype)
        map_size = map_size[:, None, :].expand(-1, points, -1).contiguous()
        starts = torch.tensor([0, *(h * w for h, w in spatial_shapes)], device=device).cumsum(0)[:-1]
        first_rows = (torch.arange(batch, device=device)[:, None] * length + starts) * heads  # (N, L)
        first_rows = first_rows[:, None, None, :] + torch.arange(heads, device=device)[:, None]  # (N, 1, M, L)
        steps = torch.stack([torch.zeros_like(widths), torch.ones_like(widths), widths, widths + 1], -1) * heads
        return Layout(
            half_size=map_size / 2,
            first_pixel=torch.zeros_like(map_size),
            before_first=torch.full_like(map_size, -1),
            before_last=map_size - 2,
            last_pixel=map_size - 1,
            map_size=map_size,
            level_width=widths[:, None].expand(-1, points).to(index).contiguous(),
            first_rows=first_rows[..., None].expand(-1, -1, -1, -1, points).to(index).contiguous(),
            steps=steps[:, None, :].expand(-1, points, -1).to(index).contiguous(),
            rows_total=batch * length * heads,
        )


def bilinear_corners(sampling_locations: Tensor, spatial_shapes: SpatialShapes, length: int, heads: int) -> Corners:
    """The corners of ``sampling_locations`` (N, Q, M, L, P, 2) in a value of ``length`` positions per image."""
    batch, points, dtype = sampling_locations.shape[0], sampling_locations.shape[4], sampling_locations.dtype
    shape = layout(tuple(spatial_shapes), points, batch, length, heads, dtype, sampling_locations.device)

    # x * w - 0.5 as grid_sample computes it: from its grid 2x - 1, with one rounding after the
    # multiply-add (addcmul is fused, as grid_sample's kernel and Deformable-DETR's CUDA op are). A
    # point on a pixel centre, as the initial pattern's encoder points are, then falls on the same
    # side of it as in the reference, and takes the same gradient (the bilinear slope on that side).
    grid_plus_one = (2 * sampling_locations).sub_(1).add_(1)
    pixel = torch.addcmul(shape.before_first / 2, grid_plus_one, shape.half_size)
    top_left = pixel.floor()
    fraction = pixel.sub_(top_left)
    # per axis: the top-left corner's column / row on the map, and the one after it
    near = torch.clamp(top_left, shape.first_pixel, shape.last_pixel) == top_left
    far = torch.clamp(top_left, shape.before_first, shape.before_last) == top_left
    inside = torch.stack([near, far], -2)  # (..., 2 corners, 2 axes)

    # A corner off the map weighs 0 but must still name a row: keep it within one pixel of the map,
    # then within the table (a corner before the first level's first row or after the last one's).
    top_left = torch.clamp(top_left, shape.before_first, shape.last_pixel).to(shape.level_width.dtype)
    rows = (top_left[..., 1] * shape.level_width + top_left[..., 0]) * heads + shape.first_rows  # (N, Q, M, L, P)
    rows = (rows[..., None] + shape.steps).clamp_(0, shape.rows_total - 1)
    return Corners(rows, fraction, inside, shape.map_size)
