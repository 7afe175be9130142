"""Hungarian matching for a sigmoid head: the focal loss's class cost."""

from __future__ import annotations

from torch import Tensor

from ..matcher import BaseHungarianMatcher

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
EPS = 1e-8  # keeps the logs finite at p = 0 and p = 1


def check_focal(alpha: float, gamma: float) -> None:
    """The focal terms' weights: ``alpha`` in [0, 1], ``gamma`` >= 0 (the matcher's and the loss's alike)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"focal alpha must be in [0, 1], got {alpha}")
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")


class FocalHungarianMatcher(BaseHungarianMatcher):
    """Deformable-DETR's matcher: the class cost of a query for a target is what the focal loss would
    gain by calling it the target's class, ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``
    with p the sigmoid score of that class. Box costs as DETR's; Deformable-DETR's weights 2/5/2."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = FOCAL_ALPHA,
        gamma: float = FOCAL_GAMMA,
    ):
        super().__init__(cost_class, cost_bbox, cost_giou)
        check_focal(alpha, gamma)
        self.alpha = alpha
        self.gamma = gamma

    def class_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        p = logits.sigmoid()[:, target_labels]
        positive = self.alpha * (1 - p) ** self.gamma * -(p + EPS).log()
        negative = (1 - self.alpha) * p**self.gamma * -(1 - p + EPS).log()
        return positive - negative
