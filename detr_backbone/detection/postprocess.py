"""DETR's outputs as detections: a score, a label and an absolute (x0, y0, x1, y1) box per query."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


def batched_detections(logits: Tensor, boxes: Tensor, target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PostProcess on whole tensors: scores (B, Q), labels (B, Q) and XYXY boxes (B, Q, 4) in pixels of
    ``target_sizes`` (B, 2) as (h, w). No loop over images, so it traces with a dynamic batch (export)."""
    scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
    height, width = target_sizes.float().unbind(1)
    scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
    return scores, labels, box_convert(boxes.float(), "cxcywh", "xyxy") * scale


class PostProcess(nn.Module):
    """One dict {"scores", "labels", "boxes"} per image, boxes in pixels of ``target_sizes`` (B, 2) as (h, w).

    Every query is kept; its score is the best real class's probability, "no object" excluded,
    so that ranking by score (as COCO evaluation does) ranks by how object-like a query is.
    """

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (len(logits), 2):
            raise ValueError(f"target_sizes must be (batch, 2) = ({len(logits)}, 2) as (h, w), got {tuple(target_sizes.shape)}")
        scores, labels, absolute = batched_detections(logits, boxes, target_sizes)
        return [
            {"scores": image_scores, "labels": image_labels, "boxes": image_boxes}
            for image_scores, image_labels, image_boxes in zip(scores, labels, absolute)
        ]
