"""DETR's Hungarian matcher: the class cost of a softmax head with a "no object" class."""

from __future__ import annotations

from torch import Tensor

from ..matcher import BaseHungarianMatcher


class HungarianMatcher(BaseHungarianMatcher):
    """DETR's matcher: the class cost of a query for a target is minus the softmax probability of the
    target's class. The probability itself, not its log: it is on the scale of the box terms and stays
    finite for hopeless queries. Unmatched queries are left for "no object"."""

    def class_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        return -logits.softmax(-1)[:, target_labels]
