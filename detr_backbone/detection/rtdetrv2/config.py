"""RT-DETRv2's schema (conf/model/rtdetrv2*.yaml): the real-time heads' shared schema, whose defaults are
RT-DETRv2-R50's."""

from __future__ import annotations

from dataclasses import dataclass

from ..realtime.config import RealTimeHeadConfig


@dataclass
class RtDetrV2Config(RealTimeHeadConfig):
    """RT-DETRv2: the hybrid encoder, queries from the encoder's top-k, a deformable decoder whose layers move
    each box in logit space, denoising, and the varifocal loss."""

    _target_: str = "detr_backbone.detection.rtdetrv2.build_rtdetrv2"
