"""Boxes between the detectors' normalised (cx, cy, w, h) and pixels, and detections as one dict per image."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchvision.ops import box_convert


def absolute_boxes(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """Normalised cxcywh boxes (B, K, 4) as XYXY in pixels of ``target_sizes`` (B, 2) as (h, w), in float32."""
    height, width = target_sizes.float().unbind(1)
    scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
    return box_convert(boxes.float(), "cxcywh", "xyxy") * scale


def target_boxes_in_pixels(target: Mapping[str, Tensor]) -> Tensor:
    """A target's normalised cxcywh boxes as XYXY in pixels of its original image (``orig_size``)."""
    return absolute_boxes(target["boxes"][None], target["orig_size"][None])[0]


def per_image(scores: Tensor, labels: Tensor, boxes: Tensor) -> list[dict[str, Tensor]]:
    """A detector's ``detections`` (scores, labels, boxes of the whole batch) as one dict per image."""
    return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]
