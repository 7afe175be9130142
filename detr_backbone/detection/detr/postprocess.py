"""DETR's outputs as detections: every query with its best real class, "no object" excluded."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..boxes import absolute_boxes
from ..postprocess import DetectionPostProcess, Detections


def softmax_detections(outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
    """Scores (B, Q), labels (B, Q) and XYXY boxes (B, Q, 4) in pixels of ``target_sizes`` (B, 2) as (h, w).

    A query's score is its best real class's probability, so that ranking by score (as COCO
    evaluation does) ranks by how object-like a query is. No loop over images, so it traces with a
    dynamic batch (export).
    """
    scores, labels = outputs["pred_logits"].float().softmax(-1)[..., :-1].max(-1)
    return scores, labels, absolute_boxes(outputs["pred_boxes"], target_sizes)


class PostProcess(DetectionPostProcess):
    """DETR's ``PostProcess``: every query kept, with its best real class."""

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
        return softmax_detections(outputs, target_sizes)
