"""The Triton programs of ``triton_kernel``: bilinear multi-scale sampling, forward and backward.

Importing this module imports Triton, and ``@triton.jit`` decides at that moment whether the
programs compile for the GPU or run in Triton's interpreter (``TRITON_INTERPRET=1``: numpy on
CPU tensors); ``triton_kernel`` imports it on first use, so the variable may be set until then.

Layouts, all contiguous: value (N, S, M, D), locations (N, Q, M, L, P, 2), weights (N, Q, M, L, P),
output and its gradient (N, Q, M, D), ``levels`` (L, 3) int64 rows (h, w, first position in S).
A program owns one batch entry and head (grid axis 1) and ``BLOCK_Q`` queries (axis 0), each with
all D channels: a (BLOCK_Q, BLOCK_D) tile. It loops over levels and points; every point reads
its four corners' channel vectors, a corner off the map masked to zero, as ``F.grid_sample``
with ``padding_mode="zeros"`` reads it. Arithmetic runs in ``COMPUTE`` (float32 for half
inputs, which are loaded as they are and converted on load, float64 for float64).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pixel(loc, size, COMPUTE: tl.constexpr):
    """A location in [0, 1] in pixels of a map ``size`` wide, rounded as grid_sample rounds it: so that a
    point on a pixel centre (the initial pattern puts them there) lands on the same side of it, and gets
    the same one-sided gradient. grid_sample, on CPU and CUDA alike, computes ``((grid + 1) * size - 1) / 2``
    with a fused multiply-add, on ``grid = 2 * loc - 1`` rounded."""
    shifted = loc * 2.0 - 1.0 + 1.0
    if tl.float64 == COMPUTE:
        pixel = tl.fma(shifted, size.to(tl.float64), -1.0)
    else:  # a float32 product is exact in float64, so one rounding of the float64 sum is the fma's
        pixel = (shifted.to(tl.float64) * size - 1.0).to(tl.float32)
    return pixel / 2.0


@triton.jit
def _point(loc_ptr, weight_ptr, index, q_ok, height, width, COMPUTE: tl.constexpr):
    """Where the points ``index`` (BLOCK_Q,) read: top-left corner (x0, y0) as floats, the fractions past
    it, their attention weight, and which of the columns x0, x0 + 1 and rows y0, y0 + 1 lie on the map."""
    loc_x = tl.load(loc_ptr + 2 * index, mask=q_ok, other=0.0).to(COMPUTE)
    loc_y = tl.load(loc_ptr + 2 * index + 1, mask=q_ok, other=0.0).to(COMPUTE)
    weight = tl.load(weight_ptr + index, mask=q_ok, other=0.0).to(COMPUTE)
    pixel_x = _pixel(loc_x, width, COMPUTE)
    pixel_y = _pixel(loc_y, height, COMPUTE)
    x0 = tl.floor(pixel_x)
    y0 = tl.floor(pixel_y)
    near_x = (x0 >= 0) & (x0 < width)
    far_x = (x0 >= -1) & (x0 < width - 1)
    near_y = (y0 >= 0) & (y0 < height)
    far_y = (y0 >= -1) & (y0 < height - 1)
    return x0, y0, pixel_x - x0, pixel_y - y0, weight, near_x, far_x, near_y, far_y


@triton.jit
def _corner_offsets(x0, y0, height, width, start, row_base, heads, channels, d):
    """Element offsets (BLOCK_Q, BLOCK_D) in the value of the corner (y0, x0) and the three after it."""
    # a far-off point keeps an offset next to its map (its loads are masked) that fits an integer
    x = tl.minimum(tl.maximum(x0, -1.0), width.to(x0.dtype)).to(tl.int64)
    y = tl.minimum(tl.maximum(y0, -1.0), height.to(y0.dtype)).to(tl.int64)
    top_left = ((row_base + start + y * width + x) * heads)[:, None] * channels + d[None, :]
    step_x = heads * channels
    step_y = width * heads * channels
    return top_left, top_left + step_x, top_left + step_y, top_left + step_y + step_x


@triton.jit
def _load(ptr, offsets, ok, COMPUTE: tl.constexpr):
    return tl.load(ptr + offsets, mask=ok, other=0.0).to(COMPUTE)


@triton.jit
def forward_kernel(
    value_ptr,
    levels_ptr,
    loc_ptr,
    weight_ptr,
    out_ptr,
    queries,
    length,
    heads,
    channels,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < queries
    tile_ok = q_ok[:, None] & (d < channels)[None, :]
    first_point = ((batch * queries + q) * heads + head) * (LEVELS * POINTS)  # (BLOCK_Q,) int64
    row_base = batch * length  # the value's rows are (batch, position), heads interleaved
    total = tl.zeros((BLOCK_Q, BLOCK_D), COMPUTE)
    for level in range(LEVELS):
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        start = tl.load(levels_ptr + 3 * level + 2)
        for p in range(POINTS):
            index = first_point + level * POINTS + p
            x0, y0, fx, fy, weight, near_x, far_x, near_y, far_y = _point(
                loc_ptr, weight_ptr, index, q_ok, height, width, COMPUTE
            )
            o00, o01, o10, o11 = _corner_offsets(
                x0, y0, height, width, start, row_base, heads, channels, d + head * channels
            )
            v00 = _load(value_ptr, o00, tile_ok & (near_y & near_x)[:, None], COMPUTE)
            v01 = _load(value_ptr, o01, tile_ok & (near_y & far_x)[:, None], COMPUTE)
            v10 = _load(value_ptr, o10, tile_ok & (far_y & near_x)[:, None], COMPUTE)
            v11 = _load(value_ptr, o11, tile_ok & (far_y & far_x)[:, None], COMPUTE)
            top = v00 * (1 - fx)[:, None] + v01 * fx[:, None]
            bottom = v10 * (1 - fx)[:, None] + v11 * fx[:, None]
            sample = top * (1 - fy)[:, None] + bottom * fy[:, None]
            total += sample * weight[:, None]
    out = ((batch * queries + q) * heads + head)[:, None] * channels + d[None, :]
    tl.store(out_ptr + out, total, mask=tile_ok)


@triton.jit
def backward_kernel(
    value_ptr,
    levels_ptr,
    loc_ptr,
    weight_ptr,
    grad_out_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_weight_ptr,
    queries,
    length,
    heads,
    channels,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    batch_head = tl.program_id(1)
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < queries
    tile_ok = q_ok[:, None] & (d < channels)[None, :]
    first_point = ((batch * queries + q) * heads + head) * (LEVELS * POINTS)
    row_base = batch * length
    out = ((batch * queries + q) * heads + head)[:, None] * channels + d[None, :]
    grad = tl.load(grad_out_ptr + out, mask=tile_ok, other=0.0).to(COMPUTE)
    for level in range(LEVELS):
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        start = tl.load(levels_ptr + 3 * level + 2)
        for p in range(POINTS):
            index = first_point + level * POINTS + p
            x0, y0, fx, fy, weight, near_x, far_x, near_y, far_y = _point(
                loc_ptr, weight_ptr, index, q_ok, height, width, COMPUTE
            )
            o00, o01, o10, o11 = _corner_offsets(
                x0, y0, height, width, start, row_base, heads, channels, d + head * channels
            )
            ok00 = tile_ok & (near_y & near_x)[:, None]
            ok01 = tile_ok & (near_y & far_x)[:, None]
            ok10 = tile_ok & (far_y & near_x)[:, None]
            ok11 = tile_ok & (far_y & far_x)[:, None]
            v00 = _load(value_ptr, o00, ok00, COMPUTE)
            v01 = _load(value_ptr, o01, ok01, COMPUTE)
            v10 = _load(value_ptr, o10, ok10, COMPUTE)
            v11 = _load(value_ptr, o11, ok11, COMPUTE)
            # value: each corner receives the output gradient times its share of the point
            weighted = grad * weight[:, None]
            tl.atomic_add(grad_value_ptr + o00, weighted * ((1 - fy) * (1 - fx))[:, None], mask=ok00, sem="relaxed")
            tl.atomic_add(grad_value_ptr + o01, weighted * ((1 - fy) * fx)[:, None], mask=ok01, sem="relaxed")
            tl.atomic_add(grad_value_ptr + o10, weighted * (fy * (1 - fx))[:, None], mask=ok10, sem="relaxed")
            tl.atomic_add(grad_value_ptr + o11, weighted * (fy * fx)[:, None], mask=ok11, sem="relaxed")
            # weight: the sample dotted with the output gradient
            top = v00 * (1 - fx)[:, None] + v01 * fx[:, None]
            bottom = v10 * (1 - fx)[:, None] + v11 * fx[:, None]
            sample = top * (1 - fy)[:, None] + bottom * fy[:, None]
            tl.store(grad_weight_ptr + index, tl.sum(sample * grad, axis=1), mask=q_ok)
            # location: the sample's slope along x and y, times the pixels per unit of location
            slope_x = (v01 - v00) * (1 - fy)[:, None] + (v11 - v10) * fy[:, None]
            slope_y = bottom - top
            grad_x = tl.sum(slope_x * weighted, axis=1) * width
            grad_y = tl.sum(slope_y * weighted, axis=1) * height
            tl.store(grad_loc_ptr + 2 * index, grad_x, mask=q_ok)
            tl.store(grad_loc_ptr + 2 * index + 1, grad_y, mask=q_ok)


# @triton.jit returned interpreted functions instead of JITFunctions: TRITON_INTERPRET=1 was set
INTERPRETED = not isinstance(forward_kernel, triton.runtime.JITFunction)
