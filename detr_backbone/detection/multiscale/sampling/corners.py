"""Where a bilinear sample reads: its four corners' rows in a zero-bordered table of the value.

``F.grid_sample(align_corners=False, padding_mode="zeros")`` places location x in [0, 1] of a map
w pixels wide at pixel coordinate ``x * w - 0.5`` and reads the pixels either side, weighted by the
distance to each; a corner outside the map reads zero. Here every level's map gets a border of two
zero pixels, and the value of all levels, heads and batch entries becomes one table of rows
(positions x heads, D). A coordinate clamped to [-2, w] then always has both its corners in the
bordered map, and off the map both read zeros: no corner needs a test, nor a weight set to zero,
and the slope between two border pixels is zero, as the reference's gradient there is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

BORDER = 2  # zero pixels around each map: a clamped corner pair (-2, -1) or (w, w + 1) lies in it


@dataclass(frozen=True)
class Layout:
    """The bordered table's geometry for one input layout; per-level constants are laid out over
    (levels, points), so that per-point arithmetic runs over contiguous inner dimensions."""

    shapes: tuple[tuple[int, int], ...]
    bordered_length: int  # positions of one image's bordered maps
    half_size: tuple[Tensor, Tensor]  # (L, P) each: w / 2, h / 2
    lowest: Tensor  # (L, P): -2, the lowest clamped coordinate
    highest: tuple[Tensor, Tensor]  # (L, P) each: w, h
    bordered_width: Tensor  # (L, P): w + 4
    first_rows: Tensor  # (N, 1, M, L, P) int: the row of each image's, head's and level's pixel (0, 0)
    # (4, L, P) int: rows from the top-left corner to the corners (y, x) = (0, 0), (0, 1), (1, 0), (1, 1)
    corner_steps: Tensor
    heads: int
    rows: int  # the table's rows: the bordered maps', then zero rows for the corners of a clamped NaN point
    last_top_left: int


@functools.lru_cache(maxsize=64)
def layout(shapes: tuple, points: int, batch: int, heads: int, dtype: torch.dtype, device: torch.device) -> Layout:
    bordered = [(h + 2 * BORDER, w + 2 * BORDER) for h, w in shapes]
    bordered_length = sum(h * w for h, w in bordered)
    index = torch.int32 if batch * bordered_length * heads < 2**31 else torch.int64  # half the memory where it fits
    with torch.inference_mode(False):  # usable by autograd when first built under inference mode

        def per_level(values, kind=dtype):
            return torch.tensor(values, dtype=kind, device=device)[:, None].expand(-1, points).contiguous()

        starts = torch.tensor([0, *(h * w for h, w in bordered)], device=device).cumsum(0)[:-1]
        origin = starts + BORDER * torch.tensor([w for _, w in bordered], device=device) + BORDER  # pixel (0, 0)
        first_rows = (torch.arange(batch, device=device)[:, None] * bordered_length + origin) * heads  # (N, L)
        first_rows = first_rows[:, None, None, :] + torch.arange(heads, device=device)[:, None]  # (N, 1, M, L)
        widths = torch.tensor([w for _, w in bordered], device=device)
        corner_steps = torch.stack([torch.zeros_like(widths), torch.ones_like(widths), widths, widths + 1]) * heads
        return Layout(
            shapes=shapes,
            bordered_length=bordered_length,
            half_size=(per_level([w / 2 for _, w in shapes]), per_level([h / 2 for h, _ in shapes])),
            lowest=per_level([-float(BORDER)] * len(shapes)),
            highest=(per_level([float(w) for _, w in shapes]), per_level([float(h) for h, _ in shapes])),
            bordered_width=per_level([float(w) for _, w in bordered]),
            first_rows=first_rows[..., None].expand(-1, -1, -1, -1, points).to(index).contiguous(),
            corner_steps=corner_steps[:, :, None].expand(-1, -1, points).to(index).contiguous(),
            heads=heads,
            rows=(batch * bordered_length + 1) * heads + int(corner_steps.max()),
            last_top_left=(batch * bordered_length + 1) * heads - 1,
        )


def bordered_table(value: Tensor, shape: Layout) -> Tensor:
    """(N * bordered length * M, D): each level's map inside its zero border."""
    batch, _, heads, channels = value.shape
    table = value.new_zeros(shape.rows, channels)
    images = table[: batch * shape.bordered_length * heads].view(batch, shape.bordered_length, heads * channels)
    for level_map, bordered in zip(level_maps(value, shape.shapes), bordered_maps(images, shape.shapes)):
        bordered[:, BORDER:-BORDER, BORDER:-BORDER] = level_map
    return table


def unbordered(grad_table: Tensor, value_shape: torch.Size, shape: Layout) -> Tensor:
    """The gradient of the value from the gradient of its bordered table (the border's is dropped)."""
    batch, _, heads, channels = value_shape
    images = grad_table[: batch * shape.bordered_length * heads].view(batch, shape.bordered_length, heads * channels)
    maps = [
        bordered[:, BORDER:-BORDER, BORDER:-BORDER].flatten(1, 2) for bordered in bordered_maps(images, shape.shapes)
    ]
    return torch.cat(maps, 1).view(value_shape)


def level_maps(value: Tensor, shapes) -> list[Tensor]:
    batch, _, heads, channels = value.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    return [level.view(batch, h, w, heads * channels) for level, (h, w) in zip(levels, shapes)]


def bordered_maps(images: Tensor, shapes) -> list[Tensor]:
    sizes = [(h + 2 * BORDER, w + 2 * BORDER) for h, w in shapes]
    levels = images.split([h * w for h, w in sizes], dim=1)
    return [level.view(level.shape[0], h, w, -1) for level, (h, w) in zip(levels, sizes)]


@dataclass(frozen=True)
class Corners:
    """The top-left corners of (N, Q, M, L, P) sampling points and the points' offsets from them."""

    top_left: Tensor  # (N, Q, M, L, P) int: the table row of the top-left corner
    fraction_x: Tensor  # (N, Q, M, L, P): the point's x past its top-left corner, in pixels
    fraction_y: Tensor

    def rows(self, shape: Layout) -> Tensor:
        """(N, Q, M, L, P, 4): the rows of the corners (y, x) = (0, 0), (0, 1), (1, 0), (1, 1)."""
        rows = self.top_left.new_empty((*self.top_left.shape, 4))
        for corner in range(4):  # four strided writes beat one broadcast over a 4-wide dimension
            torch.add(self.top_left, shape.corner_steps[corner], out=rows[..., corner])
        return rows


def products(along_y: tuple[Tensor, Tensor], along_x: tuple[Tensor, Tensor]) -> Tensor:
    """(N, Q, M, L, P, 4): a factor along y times one along x for the corners (y, x) = (0, 0), (0, 1), (1, 0), (1, 1)."""
    out = along_y[0].new_empty((*along_y[0].shape, 4))
    for corner, (y, x) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        torch.mul(along_y[y], along_x[x], out=out[..., corner])
    return out


def bilinear_corners(sampling_locations: Tensor, shape: Layout) -> Corners:
    """The corners of ``sampling_locations`` (N, Q, M, L, P, 2) in ``shape``'s bordered table."""
    clamped = []
    for axis in range(2):
        # x * w - 0.5 as grid_sample computes it: from its grid 2x - 1, with one rounding after the
        # multiply-add (addcmul is fused, as grid_sample's kernel and Deformable-DETR's CUDA op are).
        # A point on a pixel centre, as the initial pattern's encoder points are, then falls on the
        # same side of it as in the reference, and takes the same gradient (the slope on that side).
        grid_plus_one = (2 * sampling_locations[..., axis]).sub_(1).add_(1)
        pixel = torch.addcmul(torch.full_like(shape.lowest, -0.5), grid_plus_one, shape.half_size[axis])
        clamped.append(torch.clamp(pixel, shape.lowest, shape.highest[axis], out=pixel))
    x, y = clamped
    left, top = x.floor(), y.floor()
    # the position in the level's bordered map, exact in floating point (a map has fewer than 2^24 pixels)
    position = torch.addcmul(left, top, shape.bordered_width).to(shape.first_rows.dtype)
    # a NaN point's position converts to any integer: keep its corners in the table (it reads NaN weights)
    top_left = position.mul_(shape.heads).add_(shape.first_rows).clamp_(0, shape.last_top_left)
    return Corners(top_left, x.sub_(left), y.sub_(top))
