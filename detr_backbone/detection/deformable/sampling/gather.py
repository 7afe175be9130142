"""The gather-and-reduce core: every sample's four corners read from the value and summed with
their weights in one ``F.embedding_bag`` call, without a tensor of sampled values.

The value of all levels, heads and batch entries, each map in a zero border, is one table of rows
(``corners.bordered_table``); each (image, query, head) is a bag of L * P * 4 corner rows,
weighted by attention weight times bilinear weight. The backward keeps the corners' top-left rows
and fractions, not the samples: the value's gradient is the same reduction transposed (the corner
entries sorted by row), the weights' and locations' gradients come from the bilinear samples (and
their x and y slopes) dotted with the output's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .corners import Corners, Layout, bilinear_corners, bordered_table, layout, products, unbordered
from .shapes import SpatialShapes, check_shapes, sampling_dtype

CHUNK_ELEMENTS = 2**24  # samples x channels per step of the backward's bilinear samples (64 MiB in float32)


def gather_attention(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Weighted sum of bilinearly sampled values (the arguments of ``multi_scale_deformable_attention``)."""
    check_shapes(value, spatial_shapes, sampling_locations)
    dtype = sampling_dtype(value, sampling_locations)
    batch, _, heads, _ = value.shape
    points = sampling_locations.shape[4]
    shape = layout(tuple(map(tuple, spatial_shapes)), points, batch, heads, dtype, value.device)
    output = GatherAttention.apply(value.to(dtype), shape, sampling_locations.to(dtype), attention_weights.to(dtype))
    return output.to(value.dtype)


def bilinear_factors(corners: Corners) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The factors (1 - t, t) of the near and far corner along x and along y."""
    return (1 - corners.fraction_x, corners.fraction_x), (1 - corners.fraction_y, corners.fraction_y)


class GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, shape: Layout, locations: Tensor, weights: Tensor) -> Tensor:
        batch, _, heads, channels = value.shape
        queries = locations.shape[1]
        table = bordered_table(value, shape)
        corners = bilinear_corners(locations, shape)
        along_x, along_y = bilinear_factors(corners)
        corner_weights = products((along_y[0] * weights, along_y[1] * weights), along_x)
        bags = batch * queries * heads
        output = F.embedding_bag(
            corners.rows(shape).view(bags, -1), table, per_sample_weights=corner_weights.view(bags, -1), mode="sum"
        )
        ctx.shape, ctx.value_shape = shape, value.shape
        ctx.save_for_backward(table, weights, corners.top_left, corners.fraction_x, corners.fraction_y)
        return output.view(batch, queries, heads * channels)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        table, weights, *corner_tensors = ctx.saved_tensors
        shape, corners = ctx.shape, Corners(*corner_tensors)
        rows = corners.rows(shape)
        grad_output = grad_output.reshape(-1, table.shape[1])  # one row per bag
        along_x, along_y = bilinear_factors(corners)
        grad_value = grad_locations = grad_weights = None
        if ctx.needs_input_grad[0]:
            corner_weights = products((along_y[0] * weights, along_y[1] * weights), along_x)
            grad_table = transposed_bags(rows, corner_weights, grad_output, len(table))
            grad_value = unbordered(grad_table, ctx.value_shape, shape)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            slope = (-torch.ones_like(corners.fraction_x), torch.ones_like(corners.fraction_x))
            per_point = [  # each sample, and its derivatives along x and along y
                products(along_y, along_x),
                products(along_y, slope),
                products(slope, along_x),
            ]
            grad_weights, slope_x, slope_y = samples_dot_grad(rows, per_point, table, grad_output)
            grad_locations = torch.empty((*weights.shape, 2), dtype=weights.dtype, device=weights.device)
            for axis, slope_along in enumerate((slope_x, slope_y)):
                torch.mul(slope_along.mul_(weights), shape.half_size[axis] * 2, out=grad_locations[..., axis])
        return grad_value, None, grad_locations, grad_weights


def transposed_bags(rows: Tensor, corner_weights: Tensor, grad_output: Tensor, table_rows: int) -> Tensor:
    """The table's gradient: each row sums the output gradients of the bags that read it, weighted."""
    flat_rows = rows.reshape(-1)
    per_bag = flat_rows.numel() // len(grad_output)
    order = flat_rows.argsort()
    counts = torch.bincount(flat_rows, minlength=table_rows)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(
        (order // per_bag).to(flat_rows.dtype),
        grad_output,
        offsets.to(flat_rows.dtype),
        per_sample_weights=corner_weights.reshape(-1)[order],
        mode="sum",
    )


def samples_dot_grad(rows: Tensor, per_point: list[Tensor], table: Tensor, grad_output: Tensor) -> list[Tensor]:
    """For each weighting of the four corners: the weighted corner sum of every point dotted with its bag's
    output gradient, (N, Q, M, L, P). Computed a chunk of bags at a time, so no more than
    ``CHUNK_ELEMENTS`` sampled values exist at once."""
    bags, channels = grad_output.shape
    points_per_bag = rows[..., 0].numel() // bags
    point_rows = rows.view(bags, points_per_bag, 4)
    step = max(1, CHUNK_ELEMENTS // (points_per_bag * channels))
    results = [torch.empty(rows.shape[:-1], dtype=table.dtype, device=table.device) for _ in per_point]
    for start in range(0, bags, step):
        chunk = slice(start, start + step)
        chunk_rows = point_rows[chunk].reshape(-1, 4)
        grad = grad_output[chunk, :, None]
        for weights, result in zip(per_point, results):
            chunk_weights = weights.view(bags, points_per_bag, 4)[chunk].reshape(-1, 4)
            samples = F.embedding_bag(chunk_rows, table, per_sample_weights=chunk_weights, mode="sum")
            dots = torch.bmm(samples.view(-1, points_per_bag, channels), grad)
            result.view(bags, points_per_bag)[chunk] = dots[..., 0]
    return results
