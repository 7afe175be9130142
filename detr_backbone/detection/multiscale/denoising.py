"""Contrastive denoising queries (DINO's, also RT-DETR's): noised copies of the ground truth that the decoder
learns to restore, and their losses.

Training only. Each group holds a positive and a negative copy of every object of an image: the
positive's box is moved by less than half its size on each edge, the negative's by half to once
(``box_noise_scale`` 1), so the positive should be pulled back onto its object and the negative
called "no object". Labels are swapped for random classes with probability ``label_noise_ratio / 2``.
Images with fewer objects than the batch's most leave padding slots, whose content each head sets. The
attention mask keeps the matching queries from seeing the denoising ones (which know the answer)
and each group from seeing the others.

Layout of the D = groups * 2 * P denoising queries (P: the most objects an image of the batch has):
group g's positive copy of object j sits at ``2 g P + j``, its negative at ``2 g P + P + j``; the
matching queries follow at D.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert

from ..criterion import BaseSetCriterion
from ..matcher import Indices


@dataclass
class DenoisingQueries:
    """``labels`` (B, D) noised classes (0 on padding), ``boxes`` (B, D, 4) noised cxcywh boxes, ``valid``
    (B, D) False on padding, ``attn_mask`` (D + Q, D + Q) True where a query may not look; ``groups`` of
    ``2 * group_size`` queries each."""

    labels: Tensor
    boxes: Tensor
    valid: Tensor
    attn_mask: Tensor
    groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        return self.labels.shape[1]

    def positive_indices(self, targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        """For each image, (denoising query, target) of every group's positive copy of each target."""
        indices = []
        for target in targets:
            objects = torch.arange(len(target["labels"]), dtype=torch.int64)
            starts = torch.arange(self.groups, dtype=torch.int64) * 2 * self.group_size
            queries = (starts[:, None] + objects[None, :]).flatten()
            indices.append((queries, objects.repeat(self.groups)))
        return indices


def denoising_groups(dn_number: int, most_objects: int) -> int:
    """How many groups share ``dn_number`` positive queries: ``dn_number // most_objects``, at least one.

    DINO's own rule, ``2 dn_number // (2 most_objects)``, is the same for dn_number >= 50; below that it
    takes ``2 dn_number`` groups whatever the number of objects, which this does not copy.
    """
    return max(1, dn_number // most_objects)


def denoising_attention_mask(groups: int, group_size: int, num_queries: int, device: torch.device) -> Tensor:
    """(D + Q, D + Q) bool, True where a query may not look: matching queries see no denoising query, and a
    denoising query sees only its own group (positives and negatives); denoising queries see the matching ones."""
    padded = groups * 2 * group_size
    group = torch.arange(padded + num_queries, device=device) // (2 * group_size)
    mask = group[:, None] != group[None, :]
    mask[padded:, padded:] = False
    mask[:padded, padded:] = False
    return mask


def noised_boxes(boxes: Tensor, negative: Tensor, box_noise_scale: float) -> Tensor:
    """cxcywh ``boxes`` (N, 4) with each edge moved by up to ``box_noise_scale`` times half the box's size:
    positives by a uniform fraction in [0, 1) of it, ``negative`` rows (N,) by [1, 2); clamped to the image."""
    corners = box_convert(boxes, "cxcywh", "xyxy")
    half_sizes = boxes[:, 2:].repeat(1, 2) / 2
    sign = torch.randint(0, 2, boxes.shape, dtype=boxes.dtype, device=boxes.device) * 2.0 - 1.0
    fraction = torch.rand(boxes.shape, dtype=boxes.dtype, device=boxes.device)
    fraction = fraction + negative[:, None].to(boxes.dtype)
    corners = (corners + fraction * sign * half_sizes * box_noise_scale).clamp(min=0.0, max=1.0)
    return box_convert(corners, "xyxy", "cxcywh")


def contrastive_denoising(
    targets: Sequence[Mapping[str, Tensor]],
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    num_queries: int,
) -> DenoisingQueries | None:
    """The denoising queries of a batch's targets, None when no image has an object.

    Random draws, in DINO's order, from the global generator: which labels to swap, their new classes,
    then each box coordinate's sign and size of move."""
    counts = [len(target["labels"]) for target in targets]
    most = max(counts, default=0)
    if most == 0 or dn_number <= 0:
        return None
    groups = denoising_groups(dn_number, most)
    copies = 2 * groups  # a positive and a negative copy per group
    labels = torch.cat([target["labels"] for target in targets]).repeat(copies)
    boxes = torch.cat([target["boxes"] for target in targets]).repeat(copies, 1)
    device = labels.device
    if label_noise_ratio > 0:
        swapped = torch.nonzero(torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5).view(-1)
        labels = labels.scatter(0, swapped, torch.randint(0, num_classes, swapped.shape, device=device))
    if box_noise_scale > 0:
        copy = torch.arange(copies, device=device).repeat_interleave(sum(counts))
        boxes = noised_boxes(boxes, copy % 2 == 1, box_noise_scale)

    # where each copy of each object goes: image, then slot copy * P + its index in the image
    image = torch.cat([torch.full((count,), i, dtype=torch.int64) for i, count in enumerate(counts)]).to(device)
    slot = torch.cat([torch.arange(count, dtype=torch.int64) for count in counts]).to(device)
    image = image.repeat(copies)
    slot = (torch.arange(copies, device=device)[:, None] * most + slot[None, :]).flatten()

    padded = copies * most
    batch = len(targets)
    placed_labels = torch.zeros(batch, padded, dtype=labels.dtype, device=device)
    placed_boxes = torch.zeros(batch, padded, 4, dtype=boxes.dtype, device=device)
    valid = torch.zeros(batch, padded, dtype=torch.bool, device=device)
    placed_labels[image, slot] = labels
    placed_boxes[image, slot] = boxes
    valid[image, slot] = True
    mask = denoising_attention_mask(groups, most, num_queries, device)
    return DenoisingQueries(placed_labels, placed_boxes, valid, mask, groups, most)


class DenoisingHead:
    """What a detector trained with contrastive denoising queries holds (DINO, RT-DETRv2): their count and noise,
    and the queries of a training batch's targets."""

    training: bool
    num_classes: int
    num_queries: int
    dn_number: int
    dn_label_noise_ratio: float
    dn_box_noise_scale: float

    def denoising_queries(self, targets: Sequence[Mapping[str, Tensor]] | None) -> DenoisingQueries | None:
        """The batch's denoising queries in training with targets, else None (evaluation, predict, export)."""
        if not self.training or targets is None or self.dn_number <= 0:
            return None
        return contrastive_denoising(
            targets,
            self.dn_number,
            self.dn_label_noise_ratio,
            self.dn_box_noise_scale,
            self.num_classes,
            self.num_queries,
        )


def denoising_losses(
    criterion: BaseSetCriterion, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]], num_boxes: Tensor
) -> dict[str, Tensor]:
    """The losses of ``outputs["dn_outputs"]`` (a decoder's outputs for the denoising queries of
    ``outputs["dn_meta"]``), empty without them.

    A denoising query is assigned by construction, not matched: each group's positive copy of a target must
    restore it (class and box losses against the original label and box); the negatives and the padding only
    enter the class loss, as "no object". The losses are normalised by the box count times the number of
    groups and named ``<loss>_dn``, ``<loss>_dn_0``, ... (each carries its base loss's weight).
    """
    dn_outputs = outputs.get("dn_outputs")
    if dn_outputs is None:
        return {}
    meta = outputs["dn_meta"]
    indices = meta.positive_indices(targets)
    layers = [("", dn_outputs)] + [(f"_{i}", aux) for i, aux in enumerate(dn_outputs.get("aux_outputs", []))]
    losses = {}
    for suffix, layer in layers:
        layer_losses = criterion.assigned_losses(
            layer["pred_logits"].float(), layer["pred_boxes"].float(), targets, indices, num_boxes * meta.groups
        )
        del layer_losses["class_error"]  # a metric of the matching queries only
        losses.update({f"{name}_dn{suffix}": value for name, value in layer_losses.items()})
    return losses
