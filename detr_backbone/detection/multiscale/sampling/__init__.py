"""Multi-scale deformable attention's core, in interchangeable implementations.

Each query reads ``n_points`` bilinear samples per head and level and sums them with its attention
weights. ``grid_sample`` is the reference (Deformable-DETR's pure-PyTorch core); ``gather`` reads
the four corners of every sample straight from the flattened value and reduces them in the same
pass; ``triton`` does the same in Triton programs on a CUDA device (Deformable-DETR's CUDA op);
``auto`` takes the one measured fastest for the device and the input's size. All return the same
numbers (tests/test_attention_core.py, tests/test_attention_triton.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gather import gather_attention
from .grid_sample import grid_sample_attention
from .shapes import LOW_PRECISION, SpatialShapes
from .triton_kernel import triton_attention, triton_needs, triton_usable

IMPLEMENTATIONS = {"grid_sample": grid_sample_attention, "gather": gather_attention, "triton": triton_attention}
ATTENTION_IMPLS = ("auto", *IMPLEMENTATIONS)


def exporting() -> bool:
    """An export records portable ops: grid_sample has an ONNX operator (GridSample), embedding_bag none."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


# Below this many corner reads per call (bags x levels x points x 4) the reference's few large ops
# beat the gather core's many small ones (benchmarks/deformable_attention.py: the default job's
# encoder reads 2.6e5 corners and trains 13 % slower with gather; an 800x1066 encoder reads 9.1e6).
GATHER_MIN_READS = 2**20


def resolve_attention_impl(impl: str, device: torch.device | str | None = None, corner_reads: int = 0) -> str:
    """The implementation that runs ``impl`` on inputs on ``device``. ``auto``: grid_sample while
    exporting; triton on a CUDA device where Triton imports; else gather from ``GATHER_MIN_READS``
    corner reads a call, grid_sample below. Without a device only the name is checked and returned
    as given (a module checks its setting before it sees an input)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    if device is None:
        return impl
    device = torch.device(device)
    if impl == "auto":
        if exporting():
            return "grid_sample"
        if device.type == "cuda" and triton_usable(device):
            return "triton"
        return "gather" if corner_reads >= GATHER_MIN_READS else "grid_sample"
    if impl == "triton" and not triton_usable(device):
        usable = [name for name in IMPLEMENTATIONS if name != "triton"]
        raise RuntimeError(
            f"attention_impl='triton' cannot run on {device}: {triton_needs()}; "
            f"on {device} use one of auto, {', '.join(usable)}"
        )
    return impl


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: str = "auto",
) -> Tensor:
    """Weighted sum of bilinearly sampled values: Deformable-DETR's ``ms_deform_attn_core_pytorch``.

    ``value`` (N, S, M, D): the levels' maps flattened and concatenated (S = sum of h * w over
    ``spatial_shapes``, each (h, w)), M heads of D channels. ``sampling_locations`` (N, Q, M, L, P, 2)
    as (x, y) in [0, 1] of each level's map, pixel corners at 0 and 1 (``align_corners=False``);
    outside the map reads zeros. ``attention_weights`` (N, Q, M, L, P). Returns (N, Q, M * D) in
    ``value``'s dtype; half-precision inputs are sampled in float32.
    """
    corner_reads = sampling_locations[..., 0].numel() * 4
    core = IMPLEMENTATIONS[resolve_attention_impl(impl, value.device, corner_reads)]
    return core(value, spatial_shapes, sampling_locations, attention_weights)


__all__ = [
    "ATTENTION_IMPLS",
    "LOW_PRECISION",
    "SpatialShapes",
    "multi_scale_deformable_attention",
    "resolve_attention_impl",
    "triton_usable",
]
