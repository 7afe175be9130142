"""RT-DETRv2 (Lv et al., 2024) on the Joiner, with lyuwenyu/RT-DETR's module names so its checkpoints load.

Query selection from the encoder's top-k and RT-DETRv2's deformable decoder with denoising, on the hybrid encoder
and varifocal criterion of ``realtime``; its schema and its published layouts.
"""

from .config import RtDetrV2Config
from .rtdetrv2 import RTDETRv2, build_rtdetrv2
from .transformer import RtDetrTransformer

__all__ = ["RTDETRv2", "RtDetrTransformer", "RtDetrV2Config", "build_rtdetrv2"]
