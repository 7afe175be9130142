"""DETR's head as a plugin (conf/model/detr*.yaml): its schema, criterion and published layouts."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..head import HeadConfig
from ..published import DetectorWeights
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .weights import Architecture, published_detector_weights, read_hugging_face_folder


@dataclass
class DetrConfig(HeadConfig):
    """DETR: its transformer, a softmax class head with "no object", and its set loss."""

    _target_: str = "detr_backbone.detection.build_detr"
    pre_norm: bool = False
    eos_coef: float = 0.1  # weight of the no-object class in the cross-entropy

    ARCHITECTURE: ClassVar[type[Architecture]] = Architecture

    def criterion(self, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor]) -> SetCriterion:
        matcher = HungarianMatcher(**self.costs)
        return SetCriterion(num_classes, matcher, self.eos_coef, self.loss_weights, num_boxes_reduce)

    @classmethod
    def published_weights(cls, content: Any, path: str | os.PathLike) -> DetectorWeights | None:
        return published_detector_weights(content, path)

    @classmethod
    def published_folder(cls, folder: str | os.PathLike) -> DetectorWeights | None:
        return read_hugging_face_folder(folder)
