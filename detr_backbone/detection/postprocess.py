"""Post-processing as a module, as DETR's ``PostProcess``: a head's outputs as one dict of detections per image."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .boxes import per_image

Detections = tuple[Tensor, Tensor, Tensor]  # scores (B, K), labels (B, K), XYXY boxes (B, K, 4) in pixels


class DetectionPostProcess(nn.Module):
    """One dict {"scores", "labels", "boxes"} per image, boxes in pixels of ``target_sizes`` (B, 2) as (h, w).

    Each head's subclass says how outputs become detections (``detections``), the same rule its
    detector's ``detections`` method applies.
    """

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        batch = len(outputs["pred_logits"])
        if target_sizes.shape != (batch, 2):
            raise ValueError(
                f"target_sizes must be (batch, 2) = ({batch}, 2) as (h, w), got {tuple(target_sizes.shape)}"
            )
        return per_image(*self.detections(outputs, target_sizes))

    def detections(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> Detections:
        raise NotImplementedError
