"""DINO's set loss: the multi-scale heads' focal criterion on the matching queries, their earlier layers and the
encoder's selected proposals (``_interm``, matched with their classes), plus the denoising queries' losses.

A denoising query is assigned by construction, not matched: each group's positive copy of a target must
restore it (focal, L1 and GIoU losses against the original label and box); the negatives and the padding
only enter the focal loss, as "no object". Their losses are normalised by the box count times the number
of groups, and named ``loss_ce_dn``, ``loss_bbox_dn_0``, ...: each carries its base loss's weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from ..criterion import identity
from ..multiscale.criterion import FocalSetCriterion, focal_criterion
from .config import DinoConfig


class DinoCriterion(FocalSetCriterion):
    def extra_losses(
        self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]], num_boxes: Tensor
    ) -> dict[str, Tensor]:
        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs is None:
            return {}
        meta = outputs["dn_meta"]
        indices = meta.positive_indices(targets)
        layers = [("", dn_outputs)] + [(f"_{i}", aux) for i, aux in enumerate(dn_outputs.get("aux_outputs", []))]
        losses = {}
        for suffix, layer in layers:
            layer_losses = self.assigned_losses(
                layer["pred_logits"].float(), layer["pred_boxes"].float(), targets, indices, num_boxes * meta.groups
            )
            del layer_losses["class_error"]  # a metric of the matching queries only
            losses.update({f"{name}_dn{suffix}": value for name, value in layer_losses.items()})
        return losses


def dino_criterion(
    head: DinoConfig, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor] = identity
) -> DinoCriterion:
    """DINO's criterion from its schema (DINO-4scale's: focal matching costs 2/5/2, loss weights 1/5/2, the same for
    the denoising and the encoder's losses)."""
    return focal_criterion(head, num_classes, num_boxes_reduce, DinoCriterion)
