"""Where a bilinear sample reads: its four corners' rows in the flattened value, and their weights.

``F.grid_sample(align_corners=False, padding_mode="zeros")`` places location x in [0, 1] of a map
w pixels wide at pixel coordinate ``x * w - 0.5`` and reads the pixels either side, weighted by the
distance to each; a corner outside the map reads zero. Here the value of all levels, heads and
batch entries is one table of rows (N * S * M, D), so a corner is a row number and a sample is a
weighted sum of four rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .shapes import SpatialShapes


@dataclass(frozen=True)
class Corners:
    """The corners of (N, Q, M, L, P) sampling points, in the row layout of ``value.reshape(-1, D)``."""

    rows: Tensor  # (N, Q, M, L, P, 4) int: rows of the corners (y, x) = (0, 0), (0, 1), (1, 0), (1, 1)
    fraction: Tensor  # (N, Q, M, L, P, 2): the point's (x, y) past its top-left corner, in pixels
    inside: Tensor  # (N, Q, M, L, P, 2, 2) bool: the corners (y, x) on the map; outside ones weigh 0
    map_size: Tensor  # (L, 1, 2): each level's (w, h), the pixels per unit of sampling location

    def weights(self) -> tuple[Tensor, Tensor]:
        """The bilinear factors along x and along y, (N, Q, M, L, P, 2) each, for the near and far corner."""
        x, y = self.fraction.unbind(-1)
        return torch.stack([1 - x, x], -1), torch.stack([1 - y, y], -1)

    def corner_weights(self, along_y: Tensor, along_x: Tensor) -> Tensor:
        """(N, Q, M, L, P, 4) products of a factor along y and one along x, zero outside the map."""
        return (along_y[..., :, None] * along_x[..., None, :] * self.inside).flatten(-2)


def bilinear_corners(sampling_locations: Tensor, spatial_shapes: SpatialShapes, length: int, heads: int) -> Corners:
    """The corners of ``sampling_locations`` (N, Q, M, L, P, 2) in a value of ``length`` positions per image."""
    batch = sampling_locations.shape[0]
    device, dtype = sampling_locations.device, sampling_locations.dtype
    rows_total = batch * length * heads
    index = torch.int32 if rows_total < 2**31 else torch.int64  # half the memory of int64 where it fits
    widths = [w for _, w in spatial_shapes]
    map_size = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=dtype, device=device)[:, None, :]
    last_pixel = map_size - 1
    starts = torch.tensor([0, *(h * w for h, w in spatial_shapes)], device=device).cumsum(0)[:-1]

    pixel = sampling_locations * map_size - 0.5
    top_left = pixel.floor()
    fraction = pixel - top_left
    near = (top_left >= 0) & (top_left <= last_pixel)  # per axis: the top-left corner's column / row on the map
    far = (top_left >= -1) & (top_left < last_pixel)  # and the one after it
    inside = torch.stack([near, far], -2)  # (..., 2 corners, 2 axes)
    inside = inside[..., :, None, 1] & inside[..., None, :, 0]  # (..., y corner, x corner)

    # A corner off the map weighs 0 but must still name a row: keep it within one pixel of the map,
    # then within the table (a corner before the first level's first row or after the last one's).
    top_left = torch.minimum(top_left.clamp(min=-1), last_pixel).to(index)
    level_width = torch.tensor(widths, dtype=index, device=device)[:, None]
    first_rows = (torch.arange(batch, device=device, dtype=index)[:, None] * length + starts.to(index)) * heads
    first_rows = first_rows[:, None, None, :, None] + torch.arange(heads, device=device, dtype=index)[:, None, None]
    rows = (top_left[..., 1] * level_width + top_left[..., 0]) * heads + first_rows  # (N, Q, M, L, P)
    steps = torch.tensor([[0, 1, w, w + 1] for w in widths], dtype=index, device=device)[:, None, :] * heads
    rows = (rows[..., None] + steps).clamp_(0, rows_total - 1)
    return Corners(rows, fraction, inside, map_size)
