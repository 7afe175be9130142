"""The Triton core: one program per (image, head, block of queries) reads every sample's four
corners straight from the value and sums them in registers, and a backward program scatters the
value's gradient with atomic adds: the work of Deformable-DETR's CUDA op (``ms_deform_im2col_cuda.cuh``),
compiled by Triton at the first call instead of built as an extension.

Neither the samples nor the corners' rows are kept for the backward: it reads the corners again.
The value's gradient is accumulated in float32 (float64 for float64 inputs) and, being a sum of
atomic adds, its last bits may change from run to run. Triton is imported on first use only
(``triton_jit``): CPU-only PyTorch builds ship without it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .shapes import SpatialShapes, check_shapes, sampling_dtype

# Queries x channels per program. Registers grow by about 16 per element a thread holds (ptxas -v on
# sm_90): four a thread in the forward take 80 registers, two in the backward (four corners, the
# gradient and the slopes each) 90, with no spills; twice that spills. At D = 32: 16 and 8 queries.
NUM_WARPS = 4
FORWARD_TILE = 4 * 32 * NUM_WARPS
BACKWARD_TILE = 2 * 32 * NUM_WARPS


def triton_usable(device: torch.device | str) -> bool:
    """Whether Triton imports and runs on ``device``: a CUDA device, or any with the interpreter on."""
    try:
        from . import triton_jit
    except ImportError:
        return False
    return torch.device(device).type == "cuda" or triton_jit.INTERPRETED


def triton_attention(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Weighted sum of bilinearly sampled values (the arguments of ``multi_scale_deformable_attention``)."""
    check_shapes(value, spatial_shapes, sampling_locations)
    if not triton_usable(value.device):
        raise RuntimeError(f"the triton attention core cannot run on {value.device}: {triton_needs()}")
    # the inputs are read in their own dtype and converted on load: no float32 copy of a half value
    dtype = sampling_dtype(value, sampling_locations)
    levels = level_table(tuple((int(h), int(w)) for h, w in spatial_shapes), value.device)
    output = TritonAttention.apply(
        value.contiguous(), levels, sampling_locations.contiguous(), attention_weights.contiguous(), dtype
    )
    return output.to(value.dtype)


def triton_needs() -> str:
    """What the triton core needs, for errors that say why it cannot run."""
    try:
        import triton
    except ImportError as error:
        return f"Triton does not import ({error})"
    return f"Triton {triton.__version__} runs on CUDA devices only (on CPU under TRITON_INTERPRET=1, set before import)"


@functools.lru_cache(maxsize=64)
def level_table(spatial_shapes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """(L, 3) int64 rows (h, w, first position): built once per shapes and device, not at every call."""
    starts = [0]
    for h, w in spatial_shapes[:-1]:
        starts.append(starts[-1] + h * w)
    rows = [(h, w, start) for (h, w), start in zip(spatial_shapes, starts)]
    with torch.inference_mode(False):  # a table first built in inference mode is saved for a later backward
        return torch.tensor(rows, dtype=torch.int64, device=device)


def tile(queries: int, channels: int, elements: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D): all channels of a query in one program, as many queries as fit ``elements``."""
    block_d = power_of_two(channels)
    return min(power_of_two(queries), max(1, elements // block_d)), block_d


def power_of_two(n: int) -> int:
    """The smallest power of two >= n (tl.arange spans powers of two)."""
    return 1 << max(0, n - 1).bit_length()


def compute_type(dtype: torch.dtype):
    """The kernels' arithmetic type for ``sampling_dtype``'s answer."""
    from triton import language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, levels: Tensor, locations: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
        from .triton_jit import forward_kernel

        batch, length, heads, channels = value.shape
        queries, n_levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
        output = torch.empty(batch, queries, heads * channels, dtype=dtype, device=value.device)
        block_q, block_d = tile(queries, channels, FORWARD_TILE)
        grid = (ceil_div(queries, block_q), batch * heads)
        if output.numel():
            forward_kernel[grid](
                value, levels, locations, weights, output, queries, length, heads, channels,
                LEVELS=n_levels, POINTS=points, BLOCK_Q=block_q, BLOCK_D=block_d, COMPUTE=compute_type(dtype),
                num_warps=NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(value, levels, locations, weights)
        ctx.dtype = dtype
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        from .triton_jit import backward_kernel

        value, levels, locations, weights = ctx.saved_tensors
        dtype = ctx.dtype
        batch, length, heads, channels = value.shape
        queries, n_levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
        grad_value = torch.zeros(value.shape, dtype=dtype, device=value.device)
        grad_locations = torch.zeros(locations.shape, dtype=dtype, device=value.device)
        grad_weights = torch.zeros(weights.shape, dtype=dtype, device=value.device)
        block_q, block_d = tile(queries, channels, BACKWARD_TILE)
        grid = (ceil_div(queries, block_q), batch * heads)
        if grad_output.numel():
            backward_kernel[grid](
                value, levels, locations, weights, grad_output.contiguous(), grad_value, grad_locations, grad_weights,
                queries, length, heads, channels,
                LEVELS=n_levels, POINTS=points, BLOCK_Q=block_q, BLOCK_D=block_d, COMPUTE=compute_type(dtype),
                num_warps=NUM_WARPS,
            )  # fmt: skip
        return (
            grad_value.to(value.dtype) if ctx.needs_input_grad[0] else None,
            None,
            grad_locations.to(locations.dtype) if ctx.needs_input_grad[2] else None,
            grad_weights.to(weights.dtype) if ctx.needs_input_grad[3] else None,
            None,
        )


def ceil_div(n: int, block: int) -> int:
    return -(-n // block)
