"""Deformable DETR (Zhu et al., 2021) on the Joiner, with its module names so its checkpoints load strictly.

Multi-scale deformable attention in plain PyTorch, the deformable transformer (iterative box
refinement and two-stage as options), the detector, its focal-loss matcher and criterion, and the
top-k post-processing of a sigmoid head, and its schema.
"""

from .attention import MSDeformAttn, multi_scale_deformable_attention
from .config import DeformableDetrConfig
from .criterion import FocalSetCriterion, build_deformable_criterion
from .deformable_detr import DeformableDETR, build_deformable_detr
from .matcher import FocalHungarianMatcher
from .postprocess import TopKPostProcess, topk_detections
from .transformer import DeformableTransformer

__all__ = [
    "DeformableDETR",
    "DeformableDetrConfig",
    "DeformableTransformer",
    "FocalHungarianMatcher",
    "FocalSetCriterion",
    "MSDeformAttn",
    "TopKPostProcess",
    "build_deformable_criterion",
    "build_deformable_detr",
    "multi_scale_deformable_attention",
    "topk_detections",
]
