"""The gather-and-reduce core: every sample's four corners read from the value and summed with
their weights in one ``F.embedding_bag`` call, without a tensor of sampled values.

The value of all levels, heads and batch entries, each map in a zero border, is one table of rows
(``corners.bordered_table``); each (image, query, head) is a bag of L * P * 4 corner rows,
weighted by attention weight times bilinear weight. The backward keeps the corners' top-left rows
and fractions, not the samples: the value's gradient is the same reduction transposed (the corner
entries sorted by row), the weights' and locations' gradients follow from each corner's value
dotted with the output's gradient, which ``embedding_bag``'s own backward computes in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .corners import Corners, Layout, bilinear_corners, bordered_table, layout, products, unbordered
from .shapes import SpatialShapes, check_shapes, sampling_dtype


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
        grad_output = grad_output.reshape(-1, table.shape[1])  # one row per bag
        (x_near, x_far), (y_near, y_far) = bilinear_factors(corners)
        grad_value = grad_locations = grad_weights = None
        if ctx.needs_input_grad[0]:
            near, far = y_near * weights, y_far * weights
            corner_weights = [near * x_near, near * x_far, far * x_near, far * x_far]
            grad_table = transposed_bags(corners.top_left, shape, corner_weights, grad_output, len(table))
            grad_value = unbordered(grad_table, ctx.value_shape, shape)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            top_left, top_right, bottom_left, bottom_right = corner_dots(corners.rows(shape), table, grad_output)
            top = top_left * x_near + top_right * x_far  # the rows' samples, dotted with the gradient
            bottom = bottom_left * x_near + bottom_right * x_far
            grad_weights = top * y_near + bottom * y_far
            along_x = (top_right - top_left) * y_near + (bottom_right - bottom_left) * y_far
            grad_locations = torch.empty((*weights.shape, 2), dtype=weights.dtype, device=weights.device)
            for axis, slope in enumerate((along_x, bottom - top)):  # d/dx, d/dy of the sample, in pixels
                torch.mul(slope.mul_(weights), shape.half_size[axis] * 2, out=grad_locations[..., axis])
        return grad_value, None, grad_locations, grad_weights


def transposed_bags(
    top_left: Tensor, shape: Layout, corner_weights: list[Tensor], grad_output: Tensor, table_rows: int
) -> Tensor:
    """The table's gradient: each row sums the output gradients of the bags that read it, weighted.

    It is an ``embedding_bag`` over the output gradient with the entries sorted by table row. One
    sort serves all four corners: a corner's row is its top-left row plus a step fixed per level,
    and each level's corners stay within its own rows, so sorting the top-left rows sorts each
    corner's rows too.
    """
    flat = top_left.reshape(-1)
    order = flat.argsort()
    bags = (order // (len(flat) // len(grad_output))).to(flat.dtype)
    grad_table = None
    for corner, weights in enumerate(corner_weights):
        rows = (top_left + shape.corner_steps[corner]).reshape(-1)
        counts = torch.bincount(rows, minlength=table_rows)
        offsets = (torch.cumsum(counts, 0) - counts).to(flat.dtype)
        part = F.embedding_bag(bags, grad_output, offsets, per_sample_weights=weights.reshape(-1)[order], mode="sum")
        grad_table = part if grad_table is None else grad_table.add_(part)
    return grad_table


def corner_dots(rows: Tensor, table: Tensor, grad_output: Tensor) -> tuple[Tensor, ...]:
    """Each corner's value dotted with its bag's output gradient, (N, Q, M, L, P) per corner: the
    gradient of ``embedding_bag`` with respect to its per-sample weights, a fused gather-and-dot."""
    bags = len(grad_output)
    with torch.enable_grad():
        probe = torch.ones(rows.numel() // bags, dtype=table.dtype, device=table.device).expand(bags, -1)
        probe.requires_grad_()
        output = F.embedding_bag(rows.view(bags, -1), table, per_sample_weights=probe, mode="sum")
        (dots,) = torch.autograd.grad(output, probe, grad_output)
    return dots.view(rows.shape).unbind(-1)
