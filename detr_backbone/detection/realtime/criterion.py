"""The real-time heads' set loss (RT-DETRv2's): the varifocal loss for the classes, L1 and GIoU for the boxes, on the matching queries,
their earlier layers, the selected proposals and the denoising queries (``multiscale.denoising``).

The varifocal loss (VarifocalNet) is a binary cross-entropy of every query and class against a soft target:
a matched query's target for its object's class is the IoU of its box with the object's (detached), every
other target is 0; positives weigh their target, negatives ``alpha * p^gamma`` (p the sigmoid score), so
easy negatives fade and a well-placed box is asked for a high score. Summed and divided by the box count.
Matching uses the focal class cost (alpha 0.25), as RT-DETRv2 does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from ..criterion import BaseSetCriterion, assigned_targets, class_error, identity
from ..matcher import Indices
from ..multiscale.denoising import denoising_losses
from ..multiscale.matcher import FOCAL_GAMMA, FocalHungarianMatcher
from .config import RealTimeHeadConfig


class VarifocalSetCriterion(BaseSetCriterion):
    """``loss_ce`` is the varifocal loss; the rest as ``BaseSetCriterion``, plus the denoising losses."""

    def __init__(
        self,
        num_classes: int,
        matcher: FocalHungarianMatcher,
        alpha: float,
        gamma: float,
        loss_weights: Mapping[str, float],
        num_boxes_reduce: Callable[[Tensor], Tensor] = identity,
    ):
        super().__init__(num_classes, matcher, loss_weights, num_boxes_reduce)
        self.alpha = alpha
        self.gamma = gamma

    def assigned_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        matched, target_labels, target_boxes = assigned_targets(targets, indices, logits.device)
        matched_boxes = boxes[matched]
        ious = torch.diag(
            box_iou(box_convert(matched_boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        )
        return {
            **self.varifocal_loss(logits, matched, target_labels, ious.detach(), num_boxes),
            **self.box_losses(matched_boxes, target_boxes, num_boxes),
        }

    def varifocal_loss(
        self, logits: Tensor, matched: tuple[Tensor, Tensor], target_labels: Tensor, ious: Tensor, num_boxes: Tensor
    ) -> dict[str, Tensor]:
        images, queries = (index.to(logits.device) for index in matched)
        one_hot = torch.zeros_like(logits)
        one_hot[images, queries, target_labels] = 1
        target_score = torch.zeros_like(logits)
        target_score[images, queries, target_labels] = ious.to(logits.dtype)
        weight = self.alpha * logits.sigmoid().detach().pow(self.gamma) * (1 - one_hot) + target_score
        loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="sum")
        return {"loss_ce": loss / num_boxes, "class_error": class_error(logits[matched].detach(), target_labels)}

    def extra_losses(
        self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]], num_boxes: Tensor
    ) -> dict[str, Tensor]:
        return denoising_losses(self, outputs, targets, num_boxes)


def varifocal_criterion(
    head: RealTimeHeadConfig, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor] = identity
) -> VarifocalSetCriterion:
    """RT-DETRv2's criterion from a real-time head's schema (focal matching costs 2/5/2 at alpha 0.25; varifocal alpha 0.75,
    gamma 2; loss weights 1/5/2, the same for every layer, the proposals and the denoising queries)."""
    matcher = FocalHungarianMatcher(**head.costs, alpha=head.focal_alpha, gamma=FOCAL_GAMMA)
    return VarifocalSetCriterion(
        num_classes, matcher, head.vfl_alpha, head.vfl_gamma, head.loss_weights, num_boxes_reduce
    )
