"""Deformable DETR (Zhu et al., 2021) on the Joiner, with its module names so its checkpoints load strictly.

Its transformer (iterative box refinement and two-stage as options), the detector, its schema and the
published layouts it reads; the attention, levels, focal criterion and top-k post-processing it shares
with the other multi-scale heads are in ``detection.multiscale``, and importable from here too.
"""

from ..multiscale import (
    FocalHungarianMatcher,
    FocalSetCriterion,
    MSDeformAttn,
    TopKPostProcess,
    multi_scale_deformable_attention,
    topk_detections,
)
from .config import DeformableDetrConfig
from .deformable_detr import DeformableDETR, build_deformable_detr
from .transformer import DeformableTransformer

__all__ = [
    "DeformableDETR",
    "DeformableDetrConfig",
    "DeformableTransformer",
    "FocalHungarianMatcher",
    "FocalSetCriterion",
    "MSDeformAttn",
    "TopKPostProcess",
    "build_deformable_detr",
    "multi_scale_deformable_attention",
    "topk_detections",
]
