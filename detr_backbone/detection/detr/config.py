"""DETR's schema (conf/model/detr*.yaml); its defaults are DETR's published ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..head import TransformerHeadConfig


@dataclass
class DetrConfig(TransformerHeadConfig):
    """DETR: its transformer, a softmax class head with "no object", and its set loss."""

    _target_: str = "detr_backbone.detection.build_detr"
    pre_norm: bool = False
    eos_coef: float = 0.1  # weight of the no-object class in the cross-entropy

    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (*TransformerHeadConfig.TRAINING_FIELDS, "eos_coef")
