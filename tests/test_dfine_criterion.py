"""D-FINE's criterion and DEIM's matchability-aware loss: the weighting function, target bins, FGL, DDF, the matching
union and MAL against hand computations, and the whole criterion on outputs shaped as D-FINE's head gives them."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from detr_backbone.detection.dfine.config import DFineConfig
from detr_backbone.detection.dfine.criterion import (
    decoupled_distillation,
    dfine_criterion,
    fine_grained_localization,
    union_indices,
)
from detr_backbone.detection.dfine.distribution import bin_positions, boxes_to_distances, weighting_function
from detr_backbone.detection.multiscale.denoising import DenoisingQueries
from detr_backbone.detection.multiscale.matcher import FocalHungarianMatcher
from detr_backbone.detection.realtime import VarifocalSetCriterion, varifocal_criterion
from detr_backbone.detection.realtime.config import CLASS_LOSSES
from detr_backbone.detection.realtime.criterion import CLASS_LOSS_FUNCTIONS
from detr_backbone.detection.rtdetrv2 import RtDetrV2Config

UP, REG_SCALE = torch.tensor([0.5]), torch.tensor([4.0])
ROOT3 = math.sqrt(3)
# reg_max 6, |up * reg_scale| = 2: step (2 + 1)^(2 / 4) = sqrt(3), so W = -4, -2, 1 - sqrt(3), 0, sqrt(3) - 1, 2, 4
W6 = [-4.0, -2.0, 1 - ROOT3, 0.0, ROOT3 - 1, 2.0, 4.0]


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_the_weighting_function_on_a_hand_computed_case():
    torch.testing.assert_close(weighting_function(6, UP, REG_SCALE), torch.tensor(W6))


def test_target_edges_as_bin_positions_by_hand():
    reference = torch.tensor([[0.5, 0.5, 0.2, 0.4]])  # an edge unit is size / reg_scale: 0.05 wide, 0.1 high
    box = box_convert(torch.tensor([[0.38, 0.25, 0.65, 0.72]]), "xyxy", "cxcywh")
    distances = boxes_to_distances(reference, box, REG_SCALE)
    # left (0.5 - 0.38) / 0.05 - 2, top (0.5 - 0.25) / 0.1 - 2, right (0.65 - 0.5) / 0.05 - 2, bottom (0.72 - 0.5) / 0.1 - 2
    torch.testing.assert_close(distances, torch.tensor([[0.4, 0.5, 1.0, 0.2]]))
    positions = bin_positions(distances, weighting_function(6, UP, REG_SCALE))
    expected = [
        3 + 0.4 / (ROOT3 - 1),
        3 + 0.5 / (ROOT3 - 1),
        4 + (1.0 - (ROOT3 - 1)) / (2 - (ROOT3 - 1)),
        3 + 0.2 / (ROOT3 - 1),
    ]
    torch.testing.assert_close(positions, torch.tensor([expected]))
    # beyond the ends: the end bins; on a bin: that bin
    outside = bin_positions(torch.tensor([-5.0, -4.0, 2.0, 4.0, 4.5]), weighting_function(6, UP, REG_SCALE))
    torch.testing.assert_close(outside, torch.tensor([0.0, 0.0, 5.0, 6.0, 6.0]))


def test_fine_grained_localization_on_one_query():
    logits = [
        [0.2, -0.5, 1.0, 0.0, 0.3],
        [1.5, 0.0, -1.0, 0.5, 0.0],
        [0.0, 0.0, 0.0, 2.0, -2.0],
        [0.1, 0.2, 0.3, 0.4, 0.5],
    ]
    positions = [1.25, 0.0, 4.0, 2.5]  # reg_max 4: the last edge at the end bin
    iou = 0.6
    expected = 0.0
    for edge_logits, position in zip(logits, positions):
        p = softmax(edge_logits)
        below = min(math.floor(position), 3)
        share = position - below
        expected += iou * (-(1 - share) * math.log(p[below]) - share * math.log(p[below + 1]))
    loss = fine_grained_localization(
        torch.tensor(logits).reshape(1, -1), torch.tensor([positions]), torch.tensor([iou])
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_decoupled_distillation_of_two_queries_against_the_last_layer():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 2, 4 * 5), torch.randn(1, 2, 4 * 5)
    teacher_logits = torch.tensor([[[0.3, -1.0, 2.0], [-0.5, 1.0, 0.0]]])
    temperature, iou, mix = 5.0, 0.7, (1.0, ROOT3)
    divergences = []
    for query, weight in ((0, iou), (1, 1 / (1 + math.exp(-1.0)))):  # query 1: the teacher's best sigmoid score
        for edge in range(4):
            bins = slice(5 * edge, 5 * edge + 5)
            p = softmax((student[0, query, bins] / temperature).tolist())
            q = softmax((teacher[0, query, bins] / temperature).tolist())
            kl = sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))
            divergences.append(weight * temperature**2 * kl)
    matched_mean, unmatched_mean = sum(divergences[:4]) / 4, sum(divergences[4:]) / 4
    expected = (matched_mean * mix[0] + unmatched_mean * mix[1]) / (mix[0] + mix[1])
    matched = (torch.tensor([0]), torch.tensor([0]))
    loss = decoupled_distillation(student, teacher, teacher_logits, matched, torch.tensor([iou]), temperature, mix)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert decoupled_distillation(teacher, teacher, teacher_logits, matched, torch.tensor([iou]), temperature, mix) == 0


def test_the_matching_union_keeps_each_querys_most_frequent_object():
    def pairs(queries, objects):
        return (torch.tensor(queries, dtype=torch.int64), torch.tensor(objects, dtype=torch.int64))

    empty = pairs([], [])
    layers = [  # image 0 with two objects, image 1 with none
        [pairs([0, 1], [0, 1]), empty],
        [pairs([2, 0], [0, 1]), empty],
        [pairs([0, 2], [0, 1]), empty],
    ]
    (queries, objects), (no_queries, _) = union_indices(layers)
    # query 0: object 0 twice, object 1 once; query 1: object 1; query 2: objects 0 and 1 once each, the lower wins
    assert queries.tolist() == [0, 1, 2] and objects.tolist() == [0, 1, 0]
    assert no_queries.numel() == 0


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_the_matchability_aware_loss_on_a_small_case(alpha):
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}
    criterion = VarifocalSetCriterion(2, FocalHungarianMatcher(), alpha, 1.5, {"loss_ce": 1.0}, class_loss="mal")
    losses = criterion.assigned_losses(
        logits, boxes, [target], [(torch.tensor([0]), torch.tensor([0]))], torch.tensor(2.0)
    )
    iou = 0.5  # the 0.2x0.2 box inside the 0.2x0.4 one, same centre
    total = 0.0
    for query in range(2):
        for label in range(2):
            p = 1 / (1 + math.exp(-logits[0, query, label].item()))
            positive = query == 0 and label == 1
            t = iou**1.5 if positive else 0.0
            weight = 1.0 if positive else (1.0 if alpha is None else alpha) * p**1.5
            total += -weight * (t * math.log(p) + (1 - t) * math.log(1 - p))
    assert losses["loss_ce"].item() == pytest.approx(total / 2, rel=1e-6)


def test_class_loss_mal_turns_rt_detrv2s_loss_ce_into_mal():
    torch.manual_seed(3)
    outputs = {"pred_logits": torch.randn(2, 6, 3), "pred_boxes": random_boxes(2, 6)}
    targets = random_targets()
    mal = varifocal_criterion(RtDetrV2Config(class_loss="mal"), num_classes=3)
    vfl = varifocal_criterion(RtDetrV2Config(), num_classes=3)
    assert (mal.alpha, mal.gamma) == (None, 1.5)
    mal_losses, vfl_losses = mal(outputs, targets), vfl(outputs, targets)
    # DEIM's formula, written out: targets IoU^1.5 at the matched classes, positives weigh 1, negatives p^1.5
    logits = outputs["pred_logits"]
    target_scores, positives = torch.zeros_like(logits), torch.zeros_like(logits)
    for image, (queries, objects) in enumerate(mal.matcher(outputs, targets)):
        for query, obj in zip(queries.tolist(), objects.tolist()):
            box = box_convert(outputs["pred_boxes"][image, query][None], "cxcywh", "xyxy")
            iou = box_iou(box, box_convert(targets[image]["boxes"][obj][None], "cxcywh", "xyxy"))[0, 0]
            label = targets[image]["labels"][obj]
            target_scores[image, query, label] = iou**1.5
            positives[image, query, label] = 1
    p = logits.sigmoid()
    weight = p**1.5 * (1 - positives) + positives
    bce = -(target_scores * p.log() + (1 - target_scores) * (1 - p).log())
    assert mal_losses["loss_ce"].item() == pytest.approx((weight * bce).sum().item() / 4, rel=1e-5)  # 4 objects
    assert mal_losses["loss_ce"].item() != pytest.approx(vfl_losses["loss_ce"].item(), rel=1e-3)
    torch.testing.assert_close(mal_losses["loss_giou"], vfl_losses["loss_giou"])


@pytest.mark.parametrize(
    ("values", "key"), [({"class_loss": "focal"}, "class_loss"), ({"mal_alpha": 0.0}, "mal_alpha")]
)
def test_bad_class_loss_settings_are_named(values, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        RtDetrV2Config(**values)
    assert set(CLASS_LOSSES) == set(CLASS_LOSS_FUNCTIONS)


def random_boxes(batch: int, queries: int) -> torch.Tensor:
    return torch.cat([torch.rand(batch, queries, 2) * 0.6 + 0.2, torch.rand(batch, queries, 2) * 0.3 + 0.05], -1)


def random_targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.tensor([2, 0, 1]), "boxes": random_boxes(1, 3)[0]},
        {"labels": torch.tensor([1]), "boxes": random_boxes(1, 1)[0]},
    ]


def dfine_outputs(layers: int, queries: int, classes: int, reg_max: int, groups: int, agnostic: bool = False) -> dict:
    """Random outputs shaped as D-FINE's head gives them in training, for ``random_targets()``."""
    batch, most = 2, 3
    dn_queries = groups * 2 * most
    meta = DenoisingQueries(
        torch.zeros(batch, dn_queries, dtype=torch.int64),
        random_boxes(batch, dn_queries),
        torch.ones(batch, dn_queries, dtype=torch.bool),
        torch.zeros(dn_queries + queries, dn_queries + queries, dtype=torch.bool),
        groups,
        most,
    )

    def decoder(count: int) -> list[dict]:
        reference = random_boxes(batch, count)
        stack = [
            {
                "pred_logits": torch.randn(batch, count, classes),
                "pred_boxes": random_boxes(batch, count),
                "pred_corners": torch.randn(batch, count, 4 * (reg_max + 1), requires_grad=True),
                "ref_points": reference,
            }
            for _ in range(layers)
        ]
        for layer in stack:
            layer.update(teacher_corners=stack[-1]["pred_corners"], teacher_logits=stack[-1]["pred_logits"])
        return stack

    def plain(count: int, columns: int = classes) -> dict:
        return {"pred_logits": torch.randn(batch, count, columns), "pred_boxes": random_boxes(batch, count)}

    matching = decoder(queries)
    last = {key: matching[-1][key] for key in ("pred_logits", "pred_boxes", "pred_corners", "ref_points")}
    return {
        **last,
        "aux_outputs": matching[:-1],
        "pre_outputs": plain(queries),
        "enc_outputs" if agnostic else "interm_outputs": plain(queries, 1 if agnostic else classes),
        "dn_outputs": decoder(dn_queries),
        "dn_pre_outputs": plain(dn_queries),
        "dn_meta": meta,
        "up": UP,
        "reg_scale": REG_SCALE,
    }


@pytest.mark.parametrize(("class_loss", "agnostic"), [("vfl", False), ("mal", True)])
def test_the_criterion_on_outputs_of_d_fines_shape(class_loss, agnostic):
    torch.manual_seed(4)
    head = DFineConfig(dec_layers=3, reg_max=8, class_loss=class_loss)
    outputs = dfine_outputs(3, 8, 4, 8, groups=2, agnostic=agnostic)
    criterion = dfine_criterion(head, num_classes=4)
    losses = criterion(outputs, random_targets())
    box_terms = ("loss_ce", "loss_bbox", "loss_giou")
    local = ("loss_fgl", "loss_ddf")
    proposals = "_enc" if agnostic else "_interm"
    expected = {"class_error", "loss_fgl", *box_terms}
    for suffix in ("_0", "_1", "_dn_0", "_dn_1", "_dn"):
        expected |= {name + suffix for name in box_terms + local}
    for suffix in ("_pre", proposals, "_dn_pre"):
        expected |= {name + suffix for name in box_terms}
    assert set(losses) == expected
    assert all(torch.isfinite(value) for value in losses.values())
    assert losses["loss_ddf_dn"] == 0 and losses["loss_ddf_0"] > 0  # the last layer against itself; an earlier one
    weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15, "loss_ddf": 1.5}
    by_hand = sum(weights[base] * value for name, value in losses.items() for base in weights if name.startswith(base))
    torch.testing.assert_close(criterion.weighted_total(losses), by_hand)
    criterion.weighted_total(losses).backward()
    assert outputs["aux_outputs"][0]["pred_corners"].grad.abs().sum() > 0
