"""The real-time heads' set loss (RT-DETRv2's): an IoU-aware class loss, L1 and GIoU for the boxes, on the matching
queries, their earlier layers, the selected proposals and the denoising queries (``multiscale.denoising``).

Both class losses are a binary cross-entropy of every query and class against a soft target built from the IoU
of a matched query's box with its object's (detached); every other target is 0. Summed and divided by the box
count. Matching uses the focal class cost (alpha 0.25), as RT-DETRv2 does.

- ``vfl``, the varifocal loss (VarifocalNet, RT-DETRv2's and D-FINE's): the target is the IoU, positives weigh
  their target and negatives ``alpha * p^gamma`` (p the sigmoid score), so easy negatives fade and a well-placed
  box is asked for a high score.
- ``mal``, DEIM's matchability-aware loss: the target is ``IoU^gamma`` and positives weigh 1, so a poorly
  overlapping match (common once many more queries get matched) is still taught a score instead of fading;
  negatives weigh ``p^gamma`` (times ``alpha`` when given).
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


def varifocal_loss(logits: Tensor, positives: Tensor, scores: Tensor, alpha: float, gamma: float) -> Tensor:
    """The varifocal loss summed over ``logits`` (B, Q, C); ``positives`` (B, Q, C) is 1 at each matched query's
    object class, ``scores`` its IoU there (0 elsewhere)."""
    negative_weight = alpha * logits.sigmoid().detach().pow(gamma) * (1 - positives)
    return F.binary_cross_entropy_with_logits(logits, scores, weight=negative_weight + scores, reduction="sum")


def matchability_aware_loss(
    logits: Tensor, positives: Tensor, scores: Tensor, alpha: float | None, gamma: float
) -> Tensor:
    """DEIM's matchability-aware loss summed over ``logits``, the arguments as ``varifocal_loss``'s; ``alpha`` None
    weighs the negatives by ``p^gamma`` alone (DEIM's default)."""
    negative_weight = logits.sigmoid().detach().pow(gamma) * (1 - positives)
    if alpha is not None:
        negative_weight = alpha * negative_weight
    return F.binary_cross_entropy_with_logits(
        logits, scores.pow(gamma), weight=negative_weight + positives, reduction="sum"
    )


CLASS_LOSS_FUNCTIONS = {"vfl": varifocal_loss, "mal": matchability_aware_loss}  # by model.class_loss


class VarifocalSetCriterion(BaseSetCriterion):
    """``loss_ce`` is ``class_loss`` (vfl or mal, of ``CLASS_LOSS_FUNCTIONS``) at its ``alpha`` and ``gamma``; the rest as
    ``BaseSetCriterion``, plus the denoising losses."""

    def __init__(
        self,
        num_classes: int,
        matcher: FocalHungarianMatcher,
        alpha: float | None,
        gamma: float,
        loss_weights: Mapping[str, float],
        num_boxes_reduce: Callable[[Tensor], Tensor] = identity,
        class_loss: str = "vfl",
    ):
        super().__init__(num_classes, matcher, loss_weights, num_boxes_reduce)
        if class_loss not in CLASS_LOSS_FUNCTIONS:
            raise ValueError(f"class_loss={class_loss!r} is not one of {', '.join(CLASS_LOSS_FUNCTIONS)}")
        self.alpha = alpha
        self.gamma = gamma
        self.class_loss = class_loss

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
        ious = matched_ious(matched_boxes, target_boxes)
        return {
            **self.quality_class_loss(logits, matched, target_labels, ious.detach(), num_boxes),
            **self.box_losses(matched_boxes, target_boxes, num_boxes),
        }

    def quality_class_loss(
        self, logits: Tensor, matched: tuple[Tensor, Tensor], target_labels: Tensor, ious: Tensor, num_boxes: Tensor
    ) -> dict[str, Tensor]:
        """``loss_ce`` of every query, ``matched`` (image, query) to targets of ``target_labels`` whose boxes their
        own overlap by ``ious``, and ``class_error``."""
        images, queries = (index.to(logits.device) for index in matched)
        positives = torch.zeros_like(logits)
        positives[images, queries, target_labels] = 1
        scores = torch.zeros_like(logits)
        scores[images, queries, target_labels] = ious.to(logits.dtype)
        loss = CLASS_LOSS_FUNCTIONS[self.class_loss](logits, positives, scores, self.alpha, self.gamma)
        return {"loss_ce": loss / num_boxes, "class_error": class_error(logits[matched].detach(), target_labels)}

    def extra_losses(
        self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]], num_boxes: Tensor
    ) -> dict[str, Tensor]:
        return denoising_losses(self, outputs, targets, num_boxes)


def matched_ious(boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """(N,) IoU of each cxcywh box (N, 4) with its target's (N, 4)."""
    return torch.diag(box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")))


def varifocal_criterion(
    head: RealTimeHeadConfig, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor] = identity
) -> VarifocalSetCriterion:
    """RT-DETRv2's criterion from a real-time head's schema (focal matching costs 2/5/2 at alpha 0.25; varifocal alpha
    0.75, gamma 2, or DEIM's MAL at gamma 1.5 with ``class_loss=mal``; loss weights 1/5/2, the same for every layer,
    the proposals and the denoising queries)."""
    alpha, gamma = head.class_loss_focus
    return VarifocalSetCriterion(
        num_classes, focal_matcher(head), alpha, gamma, head.loss_weights, num_boxes_reduce, head.class_loss
    )


def focal_matcher(head: RealTimeHeadConfig) -> FocalHungarianMatcher:
    """A real-time head's matcher: its costs with the focal class cost at ``focal_alpha``."""
    return FocalHungarianMatcher(**head.costs, alpha=head.focal_alpha, gamma=FOCAL_GAMMA)
