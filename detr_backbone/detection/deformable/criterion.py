"""Deformable DETR's set loss: a sigmoid focal loss for the classes, without a "no object" class."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from ..criterion import BaseSetCriterion, class_error, identity
from .matcher import FOCAL_ALPHA, FOCAL_GAMMA, FocalHungarianMatcher

FOCAL_LOSS_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


class FocalSetCriterion(BaseSetCriterion):
    """``loss_ce`` is the sigmoid focal loss of every query and class against one-hot targets (an unmatched
    query's target is all zeros), summed and divided by ``num_boxes`` like the box losses, as
    Deformable-DETR does.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: FocalHungarianMatcher,
        focal_alpha: float = FOCAL_ALPHA,
        focal_gamma: float = FOCAL_GAMMA,
        loss_weights: Mapping[str, float] | None = None,
        num_boxes_reduce: Callable[[Tensor], Tensor] = identity,
    ):
        weights = FOCAL_LOSS_WEIGHTS if loss_weights is None else loss_weights
        super().__init__(num_classes, matcher, weights, num_boxes_reduce)
        if not 0 <= focal_alpha <= 1:
            raise ValueError(f"focal_alpha must be in [0, 1], got {focal_alpha}")
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def label_losses(
        self, logits: Tensor, matched: tuple[Tensor, Tensor], target_labels: Tensor, num_boxes: Tensor
    ) -> dict[str, Tensor]:
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"a sigmoid head has one logit per class: expected {self.num_classes}, got {logits.shape[-1]} "
                "(a softmax head's extra 'no object' column?)"
            )
        images, queries = (index.to(logits.device) for index in matched)
        one_hot = torch.zeros_like(logits)
        one_hot[images, queries, target_labels] = 1
        loss = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        return {"loss_ce": loss / num_boxes, "class_error": class_error(logits[matched].detach(), target_labels)}


def build_deformable_criterion(
    num_classes: int,
    *,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    loss_ce: float = 2.0,
    loss_bbox: float = 5.0,
    loss_giou: float = 2.0,
    focal_alpha: float = FOCAL_ALPHA,
    focal_gamma: float = FOCAL_GAMMA,
    num_boxes_reduce: Callable[[Tensor], Tensor] = identity,
) -> FocalSetCriterion:
    """The focal criterion with Deformable-DETR's main.py defaults: matching costs 2/5/2, loss weights 2/5/2."""
    matcher = FocalHungarianMatcher(cost_class, cost_bbox, cost_giou, alpha=focal_alpha, gamma=focal_gamma)
    weights = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
    return FocalSetCriterion(num_classes, matcher, focal_alpha, focal_gamma, weights, num_boxes_reduce)
