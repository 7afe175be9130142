"""DINO's set loss: the multi-scale heads' focal criterion on the matching queries, their earlier layers and the
encoder's selected proposals (``_interm``, matched with their classes), plus the denoising queries' losses
(``multiscale.denoising.denoising_losses``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from ..criterion import identity
from ..multiscale.criterion import FocalSetCriterion, focal_criterion
from ..multiscale.denoising import denoising_losses
from .config import DinoConfig


class DinoCriterion(FocalSetCriterion):
    def extra_losses(
        self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]], num_boxes: Tensor
    ) -> dict[str, Tensor]:
        return denoising_losses(self, outputs, targets, num_boxes)


def dino_criterion(
    head: DinoConfig, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor] = identity
) -> DinoCriterion:
    """DINO's criterion from its schema (DINO-4scale's: focal matching costs 2/5/2, loss weights 1/5/2, the same for
    the denoising and the encoder's losses)."""
    return focal_criterion(head, num_classes, num_boxes_reduce, DinoCriterion)
