"""The multi-scale heads' set loss: a sigmoid focal loss for the classes, without a "no object" class, and the
class heads' prior that goes with it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from ..criterion import BaseSetCriterion, class_error, identity
from .config import MultiScaleHeadConfig
from .matcher import FOCAL_ALPHA, FOCAL_GAMMA, FocalHungarianMatcher, check_focal

FOCAL_LOSS_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # Deformable-DETR's
PRIOR_PROBABILITY = 0.01  # every class starts this likely everywhere: the focal loss is not swamped by easy negatives


def set_prior_bias(class_embed: nn.Linear) -> None:
    """A class head's bias at the prior's logit (Deformable-DETR's and DINO's initialisation)."""
    nn.init.constant_(class_embed.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))


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
        check_focal(focal_alpha, focal_gamma)
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


def focal_criterion(
    head: MultiScaleHeadConfig,
    num_classes: int,
    num_boxes_reduce: Callable[[Tensor], Tensor] = identity,
    kind: type[FocalSetCriterion] = FocalSetCriterion,
) -> FocalSetCriterion:
    """The focal criterion of a multi-scale head's schema: its matching costs, loss weights and focal alpha."""
    matcher = FocalHungarianMatcher(**head.costs, alpha=head.focal_alpha)
    return kind(num_classes, matcher, head.focal_alpha, FOCAL_GAMMA, head.loss_weights, num_boxes_reduce)
