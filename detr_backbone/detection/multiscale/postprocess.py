"""Detections from a sigmoid head: the best (query, class) pairs, as in Deformable-DETR's PostProcess.

With one independent score per class, a query may report several classes; ranking all
query x class scores together and keeping the top K is what Deformable-DETR evaluates on COCO.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..boxes import absolute_boxes
from ..postprocess import DetectionPostProcess, Detections

NUM_DETECTIONS = 100  # COCO's maxDets


def topk_detections(
    outputs: Mapping[str, Tensor], target_sizes: Tensor, num_detections: int = NUM_DETECTIONS
) -> Detections:
    """Scores (B, K), labels (B, K) and XYXY boxes (B, K, 4) in pixels of ``target_sizes`` (B, 2) as (h, w)
    of the K = min(``num_detections``, Q * C) highest sigmoid scores among ``pred_logits`` (B, Q, C), best
    first. Whole-tensor ops only, so it traces with a dynamic batch (export)."""
    if num_detections < 1:
        raise ValueError(f"num_detections must be >= 1, got {num_detections}")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    _, queries, classes = logits.shape
    scores, index = logits.float().sigmoid().flatten(1).topk(min(num_detections, queries * classes), dim=1)
    query = torch.div(index, classes, rounding_mode="floor")
    labels = index % classes
    chosen = boxes.gather(1, query[..., None].expand(-1, -1, 4))
    return scores, labels, absolute_boxes(chosen, target_sizes)


class TopKPostProcess(DetectionPostProcess):
    """Deformable-DETR's ``PostProcess``: the ``num_detections`` best (query, class) pairs of each image."""

    def __init__(self, num_detections: int = NUM_DETECTIONS):
        super().__init__()
        if num_detections < 1:
            raise ValueError(f"num_detections must be >= 1, got {num_detections}")
        self.num_detections = num_detections

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
        return topk_detections(outputs, target_sizes, self.num_detections)
