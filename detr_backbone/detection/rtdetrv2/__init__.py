"""RT-DETRv2 (Lv et al., 2024) on the Joiner, with lyuwenyu/RT-DETR's module names so its checkpoints load.

The hybrid encoder (AIFI and CCFF), query selection from the encoder's top-k, RT-DETRv2's deformable decoder
with denoising, the varifocal criterion, its schema and its published layouts.
"""

from .config import RtDetrV2Config
from .criterion import VarifocalSetCriterion, rtdetrv2_criterion
from .hybrid_encoder import HybridEncoder, grid_sine_embedding
from .rtdetrv2 import RTDETRv2, build_rtdetrv2
from .transformer import RtDetrTransformer

__all__ = [
    "HybridEncoder",
    "RTDETRv2",
    "RtDetrTransformer",
    "RtDetrV2Config",
    "VarifocalSetCriterion",
    "build_rtdetrv2",
    "grid_sine_embedding",
    "rtdetrv2_criterion",
]
