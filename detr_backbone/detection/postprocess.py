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
    return scores, labels, absolute_boxes(boxes, target_sizes)


def absolute_boxes(boxes: Tensor, target_sizes: Tensor) -> Tensor:
    """Normalised cxcywh boxes (B, K, 4) as XYXY in pixels of ``target_sizes`` (B, 2) as (h, w), in float32."""
    height, width = target_sizes.float().unbind(1)
    scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
    return box_convert(boxes.float(), "cxcywh", "xyxy") * scale


def per_image(scores: Tensor, labels: Tensor, boxes: Tensor) -> list[dict[str, Tensor]]:
    """A detector's ``detections`` (scores, labels, boxes of the whole batch) as one dict per image."""
    return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


class PostProcess(nn.Module):
    """One dict {"scores", "labels", "boxes"} per image, boxes in pixels of ``target_sizes`` (B, 2) as (h, w).

    Every query is kept; its score is the best real class's probability, "no object" excluded,
    so that ranking by score (as COCO evaluation does) ranks by how object-like a query is.
    """

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (len(logits), 2):
            raise ValueError(
                f"target_sizes must be (batch, 2) = ({len(logits)}, 2) as (h, w), got {tuple(target_sizes.shape)}"
            )
        return per_image(*self.detections(logits, boxes, target_sizes))

    def detections(self, logits: Tensor, boxes: Tensor, target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's scores, labels and boxes, split per image by ``forward`` (subclasses change this only)."""
        return batched_detections(logits, boxes, target_sizes)
