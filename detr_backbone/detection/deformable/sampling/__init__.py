"""Multi-scale deformable attention's core, in interchangeable implementations.

Each query reads ``n_points`` bilinear samples per head and level and sums them with its attention
weights. ``grid_sample`` is the reference (Deformable-DETR's pure-PyTorch core); ``gather`` reads
the four corners of every sample straight from the flattened value and reduces them in the same
pass; ``auto`` takes the one measured fastest for the input's size. All return the same numbers (tests/test_attention_core.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gather import gather_attention
from .grid_sample import grid_sample_attention
from .shapes import LOW_PRECISION, SpatialShapes

IMPLEMENTATIONS = {"grid_sample": grid_sample_attention, "gather": gather_attention}
ATTENTION_IMPLS = ("auto", *IMPLEMENTATIONS)


def exporting() -> bool:
    """An export records portable ops: grid_sample has an ONNX operator (GridSample), embedding_bag none."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


# Below this many corner reads per call (bags x levels x points x 4) the reference's few large ops
# beat the gather core's many small ones (benchmarks/deformable_attention.py: the default job's
# encoder reads 2.6e5 corners and trains 13 % slower with gather; an 800x1066 encoder reads 9.1e6).
GATHER_MIN_READS = 2**20


def resolve_attention_impl(impl: str, sampling_locations: Tensor | None = None) -> str:
    """The implementation ``impl`` names. ``auto``: grid_sample while exporting or for small inputs
    (``sampling_locations`` given, fewer than ``GATHER_MIN_READS`` corner reads), else gather."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    if exporting():
        return "grid_sample"
    if sampling_locations is not None and sampling_locations[..., 0].numel() * 4 < GATHER_MIN_READS:
        return "grid_sample"
    return "gather"


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
    core = IMPLEMENTATIONS[resolve_attention_impl(impl, sampling_locations)]
    return core(value, spatial_shapes, sampling_locations, attention_weights)


__all__ = [
    "ATTENTION_IMPLS",
    "LOW_PRECISION",
    "SpatialShapes",
    "multi_scale_deformable_attention",
    "resolve_attention_impl",
]
