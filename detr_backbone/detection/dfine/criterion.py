"""D-FINE's set loss: the real-time heads' class loss (varifocal, or DEIM's MAL), L1 and GIoU, and two losses on the
edge distributions, fine-grained localization (FGL) and decoupled distillation (DDF).

Every prediction (the last decoder layer, each earlier one, the first layer's pre-head ``_pre``, the encoder's
selected proposals ``_interm`` / ``_enc``) is matched to the objects on its own. Its class loss uses its own matching
and the box count; its box and FGL losses use the union of all those matchings (D-FINE's "GO" indices) and the
union's own count, so that a query some layer finds an object with is taught that object by every layer.

- FGL: each matched edge's target distance, measured from the query's reference box, falls between two bins of
  W(n) (``distribution.bin_positions``); the loss is the cross-entropy of the edge's distribution against those
  two bins, each weighed by its nearness, times the IoU of the layer's box with its object's.
- DDF: each earlier layer's edge distributions learn the last layer's (its ``teacher_corners``): the KL divergence
  at temperature T (times T^2) of every query's four edges, weighed by the IoU for the matched queries and by the
  teacher's best class score for the others; the matched and unmatched means are mixed in proportion to the square
  roots of their counts (D-FINE multiplies both counts by 8 / batch size, which cancels out of the mix).

The denoising queries (``dn_outputs``: every decoder layer's, the last included, and ``dn_pre_outputs``) get the
same losses on their positive copies, assigned by construction, divided by the box count times the groups; their
DDF mixes with the matching queries' counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..criterion import assigned_targets, auxiliary_predictions, identity
from ..matcher import Indices
from ..multiscale.matcher import FocalHungarianMatcher
from ..realtime.criterion import VarifocalSetCriterion, focal_matcher, matched_ious
from .config import DFineConfig
from .distribution import bin_positions, boxes_to_distances, weighting_function


class DFineCriterion(VarifocalSetCriterion):
    """``loss_ce``, ``loss_bbox``, ``loss_giou``, ``loss_fgl`` (layers with ``pred_corners``) and ``loss_ddf`` (layers
    with ``teacher_corners``), suffixed as ``BaseSetCriterion`` names them (``_0``.., ``_pre``, ``_interm`` or
    ``_enc``, ``_dn``, ``_dn_0``.., ``_dn_pre``), and ``class_error``; NaN losses read 0, as D-FINE's."""

    def __init__(
        self,
        num_classes: int,
        matcher: FocalHungarianMatcher,
        alpha: float | None,
        gamma: float,
        loss_weights: Mapping[str, float],
        reg_max: int,
        ddf_temperature: float,
        num_boxes_reduce: Callable[[Tensor], Tensor] = identity,
        class_loss: str = "vfl",
    ):
        super().__init__(num_classes, matcher, alpha, gamma, loss_weights, num_boxes_reduce, class_loss)
        self.reg_max = reg_max
        self.ddf_temperature = ddf_temperature

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        if "pred_corners" not in outputs:
            # an evaluation's outputs (the eval_idx layer's classes and boxes): its class and box losses
            return super().forward(outputs, targets)
        device = outputs["pred_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            num_boxes = self.box_count(sum(len(t["labels"]) for t in targets), device)
            predictions = [("", outputs, targets)] + [
                (f"_{suffix}", layer, layer_targets)
                for suffix, layer, layer_targets in auxiliary_predictions(outputs, targets)
            ]
            matchings = [self.matcher(layer, layer_targets) for _, layer, layer_targets in predictions]
            union = union_indices(matchings)
            in_union = sum(len(queries) for queries, _ in union)
            num_union = self.box_count(in_union, device)
            reg_scale = outputs["reg_scale"].float()
            project = weighting_function(self.reg_max, outputs["up"].float(), reg_scale)
            # DDF's mix: how many of the matching queries the union holds, and how many it leaves out
            mix = (in_union**0.5, (outputs["pred_logits"].shape[:2].numel() - in_union) ** 0.5)

            losses = {}
            edges = LocalTargets(outputs["ref_points"], targets, union, project, reg_scale)
            for (suffix, layer, layer_targets), indices in zip(predictions, matchings):
                layer_losses = self.prediction_losses(layer, layer_targets, indices, num_boxes, edges, num_union, mix)
                if suffix:
                    del layer_losses["class_error"]  # a metric of the final prediction only
                losses.update({f"{name}{suffix}": value for name, value in layer_losses.items()})

            dn_layers = outputs.get("dn_outputs") or []
            if dn_layers:
                meta = outputs["dn_meta"]
                positives = meta.positive_indices(targets)
                num_dn = num_boxes * meta.groups
                dn_edges = LocalTargets(dn_layers[-1]["ref_points"], targets, positives, project, reg_scale)
                named = [("_dn" if i == len(dn_layers) - 1 else f"_dn_{i}", layer) for i, layer in enumerate(dn_layers)]
                if "dn_pre_outputs" in outputs:
                    named.append(("_dn_pre", outputs["dn_pre_outputs"]))
                for suffix, layer in named:
                    layer_losses = self.prediction_losses(layer, targets, positives, num_dn, dn_edges, num_dn, mix)
                    del layer_losses["class_error"]
                    losses.update({f"{name}{suffix}": value for name, value in layer_losses.items()})
        return {name: torch.nan_to_num(value, nan=0.0) for name, value in losses.items()}

    def prediction_losses(
        self,
        layer: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        num_boxes: Tensor,
        edges: LocalTargets,
        num_union: Tensor,
        mix: tuple[float, float],
    ) -> dict[str, Tensor]:
        """The class loss of one prediction's own matching ``indices``, its box and local losses of ``edges.indices``
        (the union, or the denoising positives)."""
        logits, boxes = layer["pred_logits"].float(), layer["pred_boxes"].float()
        matched, target_labels, target_boxes = assigned_targets(targets, indices, logits.device)
        ious = matched_ious(boxes[matched], target_boxes).detach()
        losses = self.quality_class_loss(logits, matched, target_labels, ious, num_boxes)

        union_boxes = boxes[edges.matched]
        losses.update(self.box_losses(union_boxes, edges.target_boxes, num_union))
        if "pred_corners" in layer:
            union_ious = matched_ious(union_boxes, edges.target_boxes).detach()
            corners = layer["pred_corners"].float()
            fgl = fine_grained_localization(corners[edges.matched], edges.positions, union_ious)
            losses["loss_fgl"] = fgl / num_union
            if "teacher_corners" in layer:
                losses["loss_ddf"] = decoupled_distillation(
                    corners,
                    layer["teacher_corners"].float(),
                    layer["teacher_logits"].float(),
                    edges.matched,
                    union_ious,
                    self.ddf_temperature,
                    mix,
                )
        return losses


class LocalTargets:
    """The queries ``indices`` assign (``matched``), their objects' boxes and each edge's target bin position
    (``positions``, (N, 4)) on W(n) (``project``), measured from ``reference_boxes`` (B, Q, 4), the boxes every layer's
    edges start from."""

    def __init__(
        self,
        reference_boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        indices: Indices,
        project: Tensor,
        reg_scale: Tensor,
    ):
        self.matched, _, self.target_boxes = assigned_targets(targets, indices, reference_boxes.device)
        reference = reference_boxes.detach().float()[self.matched]
        self.positions = bin_positions(boxes_to_distances(reference, self.target_boxes, reg_scale), project)


def union_indices(matchings: Sequence[Indices]) -> Indices:
    """Per image, every query any of ``matchings`` assigns, with the object assigned to it most often (D-FINE's
    ``_get_go_indices``). Ties go to the lowest object index: D-FINE sorts the distinct (query, object) pairs as
    ``torch.unique`` gives them (ascending) by count, in a sort that keeps their order on ties, then keeps each
    query's first pair. Queries come out in ascending order."""
    union = []
    for image_matchings in zip(*matchings):
        pairs = torch.cat([torch.stack([queries, objects], 1) for queries, objects in image_matchings])
        if len(pairs) == 0:
            union.append((pairs[:, 0], pairs[:, 1]))
            continue
        distinct, counts = torch.unique(pairs, dim=0, return_counts=True)
        distinct = distinct[torch.argsort(counts, descending=True, stable=True)]
        queries, which = torch.unique(distinct[:, 0], return_inverse=True)
        rank = torch.arange(len(distinct))
        first = torch.full((len(queries),), len(distinct)).scatter_reduce(0, which, rank, "amin")
        union.append((queries, distinct[first, 1]))
    return union


def fine_grained_localization(corner_logits: Tensor, positions: Tensor, ious: Tensor) -> Tensor:
    """FGL summed over N matched queries: ``corner_logits`` (N, 4 * (reg_max + 1)), target bin ``positions`` (N, 4),
    each query's ``ious`` (N,) with its object. An edge at position k + t costs ``(1 - t) CE(k) + t CE(k + 1)``."""
    logits = corner_logits.reshape(-1, corner_logits.shape[-1] // 4)
    positions = positions.reshape(-1)
    below = positions.floor().clamp(max=logits.shape[-1] - 2)
    upper_share = positions - below
    below = below.long()
    loss = F.cross_entropy(logits, below, reduction="none") * (1 - upper_share)
    loss = loss + F.cross_entropy(logits, below + 1, reduction="none") * upper_share
    return (loss * ious.repeat_interleave(4)).sum()


def decoupled_distillation(
    corner_logits: Tensor,
    teacher_corners: Tensor,
    teacher_logits: Tensor,
    matched: tuple[Tensor, Tensor],
    ious: Tensor,
    temperature: float,
    mix: tuple[float, float],
) -> Tensor:
    """DDF of a layer's (B, Q, 4 * (reg_max + 1)) ``corner_logits`` against the last layer's ``teacher_corners``:
    each edge's ``T^2 KL(teacher || student)`` at temperature T, weighed by ``ious`` (N,) for the ``matched`` queries
    and the teacher's best sigmoid score for the others, the two means mixed ``mix`` (matched, unmatched) to one."""
    if torch.equal(corner_logits, teacher_corners):  # the last layer against itself
        return corner_logits.sum() * 0
    bins = corner_logits.shape[-1] // 4
    student = F.log_softmax(corner_logits.unflatten(-1, (4, bins)) / temperature, dim=-1)
    teacher = F.softmax(teacher_corners.detach().unflatten(-1, (4, bins)) / temperature, dim=-1)
    divergence = F.kl_div(student, teacher, reduction="none").sum(-1) * temperature**2  # (B, Q, 4)
    weight = teacher_logits.detach().sigmoid().max(-1).values
    weight[matched] = ious.to(weight.dtype)
    divergence = divergence * weight.unsqueeze(-1)
    is_matched = torch.zeros_like(weight, dtype=torch.bool)
    is_matched[matched] = True
    matched_share, unmatched_share = mix
    matched_mean = divergence[is_matched].mean() if is_matched.any() else 0
    unmatched_mean = divergence[~is_matched].mean() if not is_matched.all() else 0
    return (matched_mean * matched_share + unmatched_mean * unmatched_share) / (matched_share + unmatched_share)


def dfine_criterion(
    head: DFineConfig, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor] = identity
) -> DFineCriterion:
    """D-FINE's criterion from its schema: the real-time heads' matcher and class loss (``model.class_loss``), loss
    weights 1/5/2 and FGL 0.15, DDF 1.5 at temperature 5, the same for every layer, the proposals and the denoising
    queries."""
    alpha, gamma = head.class_loss_focus
    return DFineCriterion(
        num_classes,
        focal_matcher(head),
        alpha,
        gamma,
        head.loss_weights,
        head.reg_max,
        head.ddf_temperature,
        num_boxes_reduce,
        head.class_loss,
    )
