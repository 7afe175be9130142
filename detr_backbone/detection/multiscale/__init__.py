"""What the heads on multi-scale deformable attention share (Deformable DETR, DINO and the heads after them).

Multi-scale deformable attention (``MSDeformAttn``) and its interchangeable cores (``sampling/``), the
encoder and decoder layers, the levels a head reads (projections, extra strided levels, valid ratios,
reference points), the encoder's proposals, box refinement in logit space, the focal matcher and
criterion, the top-k post-processing, the schema's shared fields and what published weights show.
"""

from .attention import MSDeformAttn
from .config import MultiScaleHeadConfig
from .criterion import FocalSetCriterion, focal_criterion
from .matcher import FocalHungarianMatcher
from .postprocess import TopKPostProcess, topk_detections
from .sampling import multi_scale_deformable_attention
from .transformer import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
)

__all__ = [
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "FocalHungarianMatcher",
    "FocalSetCriterion",
    "MSDeformAttn",
    "MultiScaleHeadConfig",
    "TopKPostProcess",
    "focal_criterion",
    "multi_scale_deformable_attention",
    "topk_detections",
]
