"""The set loss every head shares: match predictions to targets, classify every query, regress matched boxes."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from .matcher import BaseHungarianMatcher, Indices

LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou", "loss_fgl", "loss_ddf")  # the last two: D-FINE's edge distributions'
# a loss of denoising queries (``_dn``), then a decoder layer index, two-stage proposals, the encoder's selection or
# the first decoder layer's pre-head (D-FINE)
AUX_SUFFIX = re.compile(r"(?P<name>.+?)(?:_dn)?(?:_\d+|_enc|_interm|_pre)?")


def identity(num_boxes: Tensor) -> Tensor:
    return num_boxes


class BaseSetCriterion(nn.Module):
    """Losses of a head's outputs against targets (a list of dicts with "labels" and cxcywh "boxes").

    Returns ``loss_ce`` (each head's subclass gives its ``label_losses``), ``loss_bbox``, ``loss_giou``,
    the same with suffix ``_{i}`` for each ``aux_outputs`` entry, ``_enc`` for ``enc_outputs``
    (two-stage proposals, matched as object-or-not: every target labelled 0) and ``_interm`` for
    ``interm_outputs`` (the encoder's selected queries, matched with their classes), ``_pre`` for ``pre_outputs``
    (D-FINE's first decoder layer before its distributions), what a head adds
    in ``extra_losses``, and ``class_error`` (a detached metric). Everything is computed in float32 with autocast off: the matching and the
    normalisation by ``num_boxes`` are too sensitive for half precision. ``num_boxes_reduce`` receives
    the local box count (a float32 tensor) and returns the count to normalise by, e.g. its mean over
    processes.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: BaseHungarianMatcher,
        loss_weights: Mapping[str, float],
        num_boxes_reduce: Callable[[Tensor], Tensor] = identity,
    ):
        super().__init__()
        weights = dict(loss_weights)
        if not weights or not set(weights) <= set(LOSS_NAMES):
            raise ValueError(f"loss_weights must have some of the keys {sorted(LOSS_NAMES)}, got {sorted(weights)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.loss_weights = weights
        self.num_boxes_reduce = num_boxes_reduce

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            num_boxes = self.box_count(sum(len(t["labels"]) for t in targets), device)
            losses = self.layer_losses(outputs, targets, num_boxes)
            for suffix, extra, extra_targets in auxiliary_predictions(outputs, targets):
                extra_losses = self.layer_losses(extra, extra_targets, num_boxes)
                del extra_losses["class_error"]  # a metric of the final prediction only
                losses.update({f"{name}_{suffix}": value for name, value in extra_losses.items()})
            losses.update(self.extra_losses(outputs, targets, num_boxes))
        return losses

    def box_count(self, count: int, device: torch.device) -> Tensor:
        """What a loss over ``count`` boxes is divided by: the count reduced by ``num_boxes_reduce``, at least 1."""
        return self.num_boxes_reduce(torch.tensor(float(count), device=device)).clamp(min=1)

    def extra_losses(
        self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]], num_boxes: Tensor
    ) -> dict[str, Tensor]:
        """Losses a head adds to the matched ones (DINO: its denoising queries'); in float32, autocast off."""
        return {}

    def layer_losses(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]], num_boxes: Tensor
    ) -> dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        boxes = outputs["pred_boxes"].float()
        indices = self.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
        return self.assigned_losses(logits, boxes, targets, indices, num_boxes)

    def assigned_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """The losses of float32 ``logits`` and ``boxes`` with queries assigned to targets by ``indices``."""
        matched, target_labels, target_boxes = assigned_targets(targets, indices, logits.device)
        return {
            **self.label_losses(logits, matched, target_labels, num_boxes),
            **self.box_losses(boxes[matched], target_boxes, num_boxes),
        }

    def label_losses(
        self, logits: Tensor, matched: tuple[Tensor, Tensor], target_labels: Tensor, num_boxes: Tensor
    ) -> dict[str, Tensor]:
        """``loss_ce`` of every query (``matched``: the matched queries' indices, their targets' labels) and
        ``class_error``."""
        raise NotImplementedError

    def box_losses(self, boxes: Tensor, target_boxes: Tensor, num_boxes: Tensor) -> dict[str, Tensor]:
        loss_bbox = F.l1_loss(boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def weighted_total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The training loss: each weighted loss, auxiliary ones with the weight of their base name."""
        weighted = [
            self.loss_weights[base] * value
            for name, value in losses.items()
            if (base := AUX_SUFFIX.fullmatch(name)["name"]) in self.loss_weights
        ]
        return torch.stack(weighted).sum()


def auxiliary_predictions(
    outputs: Mapping, targets: Sequence[Mapping[str, Tensor]]
) -> Iterator[tuple[str, Mapping, Sequence]]:
    """(loss name suffix, outputs, targets) of each prediction besides the final one."""
    for index, aux in enumerate(outputs.get("aux_outputs", [])):
        yield str(index), aux, targets
    if "pre_outputs" in outputs:
        yield "pre", outputs["pre_outputs"], targets
    if "enc_outputs" in outputs:
        # the proposals only say "object here": every target counts as class 0
        yield (
            "enc",
            outputs["enc_outputs"],
            [{**target, "labels": torch.zeros_like(target["labels"])} for target in targets],
        )
    if "interm_outputs" in outputs:
        yield "interm", outputs["interm_outputs"], targets


def assigned_targets(
    targets: Sequence[Mapping[str, Tensor]], indices: Indices, device: torch.device
) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor]:
    """(image index, query index) of every assigned query (``matched_queries``), and its target's label and float32
    cxcywh box, on ``device``."""
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(device)
    boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(device, torch.float32)
    return matched_queries(indices), labels, boxes


def matched_queries(indices: Indices) -> tuple[Tensor, Tensor]:
    """(image index, query index) of every matched query, for advanced indexing of (B, Q, ...) tensors."""
    images = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(indices)])
    queries = torch.cat([queries for queries, _ in indices])
    return images, queries


def class_error(logits: Tensor, target_labels: Tensor) -> Tensor:
    """100 - top-1 accuracy of the matched queries, in percent (100 when there is nothing to match, as DETR)."""
    if target_labels.numel() == 0:
        return logits.new_tensor(100.0)
    accuracy = (logits.argmax(-1) == target_labels).float().mean() * 100
    return 100 - accuracy
