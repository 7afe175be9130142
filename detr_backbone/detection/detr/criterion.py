"""DETR's set loss: a softmax cross-entropy over the classes and "no object", down-weighted."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..criterion import BaseSetCriterion, class_error, identity
from .config import DetrConfig
from .matcher import HungarianMatcher

DEFAULT_LOSS_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


class SetCriterion(BaseSetCriterion):
    """DETR's criterion: ``loss_ce`` is the cross-entropy of every query against its target's class, or
    "no object" (the last class) for unmatched queries, that class weighted ``eos_coef``."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        loss_weights: Mapping[str, float] | None = None,
        num_boxes_reduce: Callable[[Tensor], Tensor] = identity,
    ):
        weights = DEFAULT_LOSS_WEIGHTS if loss_weights is None else loss_weights
        super().__init__(num_classes, matcher, weights, num_boxes_reduce)
        self.eos_coef = eos_coef
        # "no object" answers most queries; down-weighting it keeps the real classes from being drowned
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def label_losses(
        self, logits: Tensor, matched: tuple[Tensor, Tensor], target_labels: Tensor, num_boxes: Tensor
    ) -> dict[str, Tensor]:
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[matched] = target_labels
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.empty_weight.float())
        return {"loss_ce": loss_ce, "class_error": class_error(logits[matched].detach(), target_labels)}


def detr_criterion(
    head: DetrConfig, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor] = identity
) -> SetCriterion:
    """DETR's criterion from its schema: the matching costs, ``eos_coef`` and the loss weights."""
    return SetCriterion(num_classes, HungarianMatcher(**head.costs), head.eos_coef, head.loss_weights, num_boxes_reduce)
