"""The DINO head: its denoising queries and their loss against hand computations, DINO-4scale's published key
layout loaded strictly, the detector in training and evaluation, and a short job through predict and fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from detr_backbone.detection import build_detector, published_weights
from detr_backbone.detection.dino import DINO, DenoisingQueries, DinoConfig, contrastive_denoising, dino_criterion
from detr_backbone.detection.dino.weights import DinoArchitecture
from detr_backbone.inference import Predictor, load_detector
from detr_backbone.training.job import Job, validated

from .jobs import compose_config
from .tiny_checkpoint import DINO_HEAD, TINY_RUN

DATA = Path(__file__).parent / "data"
TARGETS = [
    {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.2, 0.3, 0.2, 0.4]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.7, 0.6, 0.2, 0.2]])},
]


def test_denoising_queries_place_noised_copies_of_the_targets_in_groups():
    # dn_number 4 over at most 2 objects an image: 2 groups of a positive and a negative copy, 8 queries
    torch.manual_seed(0)
    dn = contrastive_denoising(TARGETS, 4, 0.0, 1.0, num_classes=3, num_queries=3)
    torch.manual_seed(0)  # the draws it made, in its order: each coordinate's sign, then its fraction
    sign = torch.randint(0, 2, (12, 4)).float() * 2 - 1
    fraction = torch.rand(12, 4)
    assert (dn.groups, dn.group_size, dn.num_queries) == (2, 2, 8)
    objects = [(0, 0), (0, 1), (1, 0)]  # (image, index) in the order the draws were made for each copy
    for copy in range(4):
        for row, (image, index) in enumerate(objects):
            draw = copy * 3 + row
            cx, cy, w, h = TARGETS[image]["boxes"][index].tolist()
            edges = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            moves = [w / 2, h / 2, w / 2, h / 2]
            step = [(fraction[draw, k].item() + copy % 2) * sign[draw, k].item() * moves[k] for k in range(4)]
            x0, y0, x1, y1 = [min(max(e + s, 0.0), 1.0) for e, s in zip(edges, step)]
            slot = copy * 2 + index
            torch.testing.assert_close(
                dn.boxes[image, slot], torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
            )
            assert dn.labels[image, slot] == TARGETS[image]["labels"][index] and dn.valid[image, slot]
    assert dn.valid.tolist() == [[True] * 8, [True, False] * 4]  # the second image has one object: padding
    assert not dn.boxes[1, 1::2].any() and not dn.labels[1, 1::2].any()
    # rows: the query that looks; True: it may not see that column. Groups of 4, then the 3 matching queries
    expected = [
        "00001111000",
        "00001111000",
        "00001111000",
        "00001111000",
        "11110000000",
        "11110000000",
        "11110000000",
        "11110000000",
        "11111111000",
        "11111111000",
        "11111111000",
    ]
    assert dn.attn_mask.tolist() == [[c == "1" for c in row] for row in expected]
    # the loss assigns each group's positive copy to its target
    queries, objects_of = zip(*dn.positive_indices(TARGETS))
    assert [q.tolist() for q in queries] == [[0, 1, 4, 5], [0, 4]]
    assert [o.tolist() for o in objects_of] == [[0, 1, 0, 1], [0, 0]]


def test_label_noise_swaps_half_the_ratio_for_random_classes():
    torch.manual_seed(3)
    dn = contrastive_denoising(TARGETS, 100, 1.0, 0.0, num_classes=5, num_queries=1)
    torch.manual_seed(3)
    swapped = torch.rand(300) < 0.5  # 50 groups x 2 copies x 3 objects; half the ratio is swapped
    new = torch.randint(0, 5, (int(swapped.sum()),))
    labels = torch.tensor([2, 0, 1]).repeat(100)
    labels[swapped] = new
    assert dn.groups == 50 and swapped.any() and not swapped.all()
    placed = [[*dn.labels[0, c * 2 : c * 2 + 2].tolist(), dn.labels[1, c * 2].item()] for c in range(100)]
    assert torch.tensor(placed).flatten().tolist() == labels.tolist()
    assert torch.equal(dn.boxes[0, 4:6], TARGETS[0]["boxes"])  # no box noise at scale 0


def focal(logit: float, target: float, alpha: float = 0.25) -> float:
    p = 1 / (1 + math.exp(-logit))
    ce = -(target * math.log(p) + (1 - target) * math.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    return (alpha * target + (1 - alpha) * (1 - target)) * (1 - p_t) ** 2 * ce


def test_the_denoising_loss_on_a_hand_computed_case():
    # one image, one object of class 1; two groups: positives at 0 and 2, negatives at 1 and 3
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2]])}]
    logits = torch.tensor([[[-1.0, 2.0], [0.5, -0.5], [0.0, 1.0], [-2.0, 0.3]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.55, 0.5, 0.2, 0.4], [0.9, 0.9, 0.1, 0.1]]])
    meta = DenoisingQueries(torch.zeros(1, 4), boxes, torch.ones(1, 4, dtype=torch.bool), torch.zeros(5, 5), 2, 1)
    outputs = {"dn_outputs": {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}, "dn_meta": meta}
    criterion = dino_criterion(DinoConfig(), 2)
    losses = criterion.extra_losses(outputs, targets, torch.tensor(1.0))
    assert sorted(losses) == ["loss_bbox_dn", "loss_ce_dn", "loss_giou_dn"]
    positives = {0, 2}
    ce = sum(focal(logits[0, q, c].item(), float(q in positives and c == 1)) for q in range(4) for c in range(2))
    # query 0: x 0.4-0.6 against 0.45-0.65, same height: IoU 0.03 / 0.05, the hull is the union; query 2: inside
    giou = [0.6, 0.04 / 0.08]
    l1 = [0.05, 0.2]
    assert losses["loss_ce_dn"].item() == pytest.approx(ce / 2, rel=1e-5)  # normalised by boxes x groups
    assert losses["loss_bbox_dn"].item() == pytest.approx(sum(l1) / 2, rel=1e-5)
    assert losses["loss_giou_dn"].item() == pytest.approx(sum(1 - g for g in giou) / 2, rel=1e-5)
    # each denoising and encoder loss carries its base loss's weight (DINO-4scale's 1, 5, 2)
    parts = {
        "loss_ce_dn": torch.tensor(1.0),
        "loss_bbox_dn_0": torch.tensor(2.0),
        "loss_giou_interm": torch.tensor(3.0),
    }
    assert criterion.weighted_total(parts).item() == pytest.approx(1 + 5 * 2 + 2 * 3)


def published_keys() -> dict[str, tuple[int, ...]]:
    """DINO-4scale R50's state dict, key and shape a line, written from IDEA-Research/DINO's model built with
    config/DINO/DINO_4scale.py (num_classes 91): the keys of checkpoint0011_4scale.pth's "model"."""
    lines = (DATA / "dino_4scale_keys.txt").read_text().splitlines()
    return {
        key: tuple(map(int, shape.split("x"))) if shape else () for key, shape in (line.split(" ") for line in lines)
    }


def test_dino_4scales_published_key_layout_loads_strictly(tmp_path):
    keys = published_keys()
    # ResNet-50's 265 tensors as in DETR's checkpoints, and DINO's 361 (shared heads under each name)
    assert len(keys) == 626 and sum(key.startswith("backbone.0.body.") for key in keys) == 265
    path = tmp_path / "checkpoint0011_4scale.pth"
    state = {f"module.{key}": torch.full(shape, 0.5) for key, shape in keys.items()}  # as DDP saved it
    torch.save({"model": state, "epoch": 11, "args": {"lr": 1e-4}}, path)
    weights = published_weights(torch.load(path, weights_only=True), path)
    assert type(weights.architecture) is DinoArchitecture and weights.skipped == ["epoch", "args"]
    assert weights.architecture == DinoArchitecture(
        backbone_kind="torchvision",
        backbone_name="resnet50",
        levels=(2, 3, 4),
        hidden_dim=256,
        num_feature_levels=4,
        enc_layers=6,
        dec_layers=6,
        dim_feedforward=2048,
        nheads=8,
        enc_n_points=4,
        dec_n_points=4,
        num_queries=900,
    )
    assert weights.num_class_rows == 91 and weights.class_names[1] == "person"
    config = weights.detector_config(dilation=False)
    assert config.head == DinoConfig(dropout=0.0) and config.joiner.position.temperature == 20
    detector = config.build()
    assert {k: tuple(v.shape) for k, v in detector.state_dict().items()} == keys
    detector.load_state_dict(weights.state, strict=True)
    assert torch.equal(detector.transformer.tgt_embed.weight, torch.full((900, 256), 0.5))


def small_dino(**options) -> DINO:
    joiner = {"backbone": {"name": "resnet18", "pretrained": False}, "hidden_dim": 32}
    head = {"_target_": DinoConfig._target_, "num_queries": 6, "enc_layers": 1, "dec_layers": 2}
    torch.manual_seed(0)
    return build_detector(joiner, {**head, "dim_feedforward": 64, "num_feature_levels": 3, **options}, 3)


def test_training_adds_denoising_outputs_that_the_matching_queries_cannot_see():
    detector = small_dino(dn_number=4).train()
    images = [torch.randn(3, 64, 80), torch.randn(3, 56, 64)]
    with torch.no_grad():
        denoised = detector(images, TARGETS)
        plain = detector(images)
        detector.eval()
        evaluated = detector(images, TARGETS)
    assert set(denoised) == {"pred_logits", "pred_boxes", "aux_outputs", "interm_outputs", "dn_outputs", "dn_meta"}
    assert denoised["dn_outputs"]["pred_logits"].shape == (2, 8, 3) and len(denoised["dn_outputs"]["aux_outputs"]) == 1
    assert set(plain) == set(evaluated) == {"pred_logits", "pred_boxes", "aux_outputs", "interm_outputs"}
    assert denoised["pred_logits"].shape == (2, 6, 3) and denoised["interm_outputs"]["pred_boxes"].shape == (2, 6, 4)
    # the attention mask hides the denoising queries: the matching queries' outputs are those without them
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(denoised[key], plain[key], rtol=0, atol=1e-5)
        torch.testing.assert_close(evaluated[key], plain[key], rtol=0, atol=1e-5)
    moved = (denoised["dn_outputs"]["pred_boxes"] - plain["pred_boxes"][:, :1]).abs().max()
    assert moved > 1e-3  # they do see the denoising queries' content
    criterion = dino_criterion(DinoConfig(), 3)
    losses = criterion({**denoised, "pred_logits": denoised["pred_logits"]}, TARGETS)
    assert {"loss_ce_dn", "loss_bbox_dn_0", "loss_giou_interm", "loss_ce_0"} <= set(losses)
    assert all(torch.isfinite(value) for value in losses.values())


def test_the_jobs_training_step_gives_the_denoising_losses(tmp_path):
    job = Job(validated(compose_config(*TINY_RUN, *DINO_HEAD)), tmp_path)
    assert isinstance(job.module.detector, DINO)
    images, targets = next(iter(job.datamodule.train_dataloader()))
    job.module.train()
    losses = job.module.criterion(job.module(images, targets), targets)  # the training step's inputs
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn_0", "loss_ce_interm"} <= set(losses)


@pytest.fixture(scope="module")
def dino_checkpoint(tiny_dino_run) -> Path:
    """The TINY_RUN job with DINO_HEAD, run once a session for this file and test_export.py (tests/conftest.py)."""
    job = tiny_dino_run
    assert isinstance(job.module.detector, DINO)
    assert torch.isfinite(job.trainer.callback_metrics["train/loss"]) and job.trainer.global_step == 40
    assert not any("_dn" in name for name in job.trainer.callback_metrics)  # only the final losses are logged
    return job.run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_a_trained_dino_predicts_without_denoising_queries(dino_checkpoint):
    # its exports (ONNX, torch.export) and their evaluation are in test_export.py
    loaded = load_detector(dino_checkpoint)
    assert isinstance(loaded.detector, DINO) and not loaded.detector.training
    found = Predictor.from_loaded(loaded, size=None, threshold=0.0)(torch.rand(3, 48, 40))
    assert len(found) == 5 * 3  # num_select 100 > queries x classes: every pair, ranked


@pytest.mark.slow
def test_our_dino_checkpoint_onto_other_classes(dino_checkpoint, tmp_path):
    source = torch.load(dino_checkpoint, weights_only=True)
    saved = {k.removeprefix("detector."): v for k, v in source["state_dict"].items() if k.startswith("detector.")}
    four_classes = "data.classes=[rectangle,ellipse,triangle,star]"
    run = Job(validated(compose_config(*TINY_RUN, *DINO_HEAD, f"init_from={dino_checkpoint}", four_classes)), tmp_path)
    fresh = Job(validated(compose_config(*TINY_RUN, *DINO_HEAD, four_classes)), tmp_path / "fresh")
    state, fresh_state = run.module.detector.state_dict(), fresh.module.detector.state_dict()
    heads = [
        key for key in state if "class_embed" in key
    ]  # the decoder's per layer, under both names, and the proposals'
    assert len(heads) == 2 * (2 + 2 + 1)
    for key in [*heads, "label_enc.weight"]:
        assert torch.equal(state[key][:3], saved[key][:3])  # rectangle, ellipse, triangle: the checkpoint's rows
        assert torch.equal(state[key][3], fresh_state[key][3])  # star: a fresh row
    assert state["class_embed.0.bias"][3].item() == pytest.approx(-math.log((1 - 0.01) / 0.01))
    assert torch.equal(state["label_enc.weight"][4], saved["label_enc.weight"][3])  # the extra row, carried
    assert all(torch.equal(state[key], saved[key]) for key in state if key not in [*heads, "label_enc.weight"])
    report = (tmp_path / "init_from.txt").read_text()
    assert "classes carried over (3): rectangle <- row 0, ellipse <- row 1, triangle <- row 2" in report
    assert (
        "class_embed.1 .weight and .bias (3 class rows carried over); label_enc.weight (3 class rows carried " in report
    )
    assert "over, its 1 extra row kept); transformer.tgt_embed.weight (all 5 queries)" in report
    assert "new classes (1): star" in report


def test_a_bfloat16_dino_predicts_in_bfloat16():
    # the anchors stay float32 (their logits mix with float32 proposals); their embedding must follow the weights
    detector = small_dino().eval().to(torch.bfloat16)
    images = [torch.randn(3, 64, 96, dtype=torch.bfloat16), torch.randn(3, 48, 80, dtype=torch.bfloat16)]
    with torch.inference_mode():
        out = detector(images)
    assert out["pred_logits"].dtype == torch.bfloat16 and out["pred_logits"].shape == (2, 6, 3)
    assert torch.isfinite(out["pred_logits"]).all()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
