"""init_from for Deformable DETR: our own checkpoints onto other classes, Deformable-DETR's
official layout (plain, box refinement, two-stage), and the one-line refusals of another head's weights."""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import pytest
import torch

from detr_backbone import NestedTensor
from detr_backbone.detection import build_detector
from detr_backbone.detection.coco_names import COCO_NAMES
from detr_backbone.detection.deformable import DeformableDETR
from detr_backbone.inference import load_detector
from detr_backbone.training.init_from import REPORT_FILE
from detr_backbone.training.job import Job, validated
from detr_backbone.weights import CheckpointMismatchError

from .jobs import TINY, compose_config
from .test_init_from import coco_folder, one_line, randomized  # noqa: F401 (coco_folder: a fixture)
from .tiny_checkpoint import DEFORMABLE_HEAD, TINY_RUN, train_tiny_checkpoint

FOUR_CLASSES = "data.classes=[rectangle,ellipse,triangle,star]"
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # a fresh focal head's class bias


def job(run_dir: Path, *overrides: str) -> Job:
    return Job(validated(compose_config(*overrides)), run_dir)


def class_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [key for key in state if "class_embed" in key]


@pytest.fixture(scope="module")
def deformable_checkpoint(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("deformable"), *DEFORMABLE_HEAD)


@pytest.mark.slow
def test_our_deformable_checkpoint_onto_other_classes(deformable_checkpoint, tmp_path):
    source = torch.load(deformable_checkpoint, weights_only=True)
    saved = {k.removeprefix("detector."): v for k, v in source["state_dict"].items() if k.startswith("detector.")}
    run = job(tmp_path / "run", *TINY_RUN, *DEFORMABLE_HEAD, f"init_from={deformable_checkpoint}", FOUR_CLASSES)
    fresh = job(tmp_path / "fresh", *TINY_RUN, *DEFORMABLE_HEAD, FOUR_CLASSES).module.detector.state_dict()
    state = run.module.detector.state_dict()
    heads = class_keys(state)
    assert heads == [
        f"class_embed.{i}.{kind}" for i in range(2) for kind in ("weight", "bias")
    ]  # one per decoder layer
    for key in heads:
        assert torch.equal(state[key][:3], saved[key])  # rectangle, ellipse, triangle: the checkpoint's rows
        assert torch.equal(state[key][3], fresh[key][3])  # star: a fresh head's row
    assert state["class_embed.0.bias"][3].item() == pytest.approx(PRIOR_BIAS)
    assert all(torch.equal(state[key], saved[key]) for key in state if key not in heads)
    report = (tmp_path / "run" / REPORT_FILE).read_text()
    assert "source: train.py checkpoint (resnet18, hidden_dim 32, 3 levels, 1 encoder + 2 decoder layers" in report
    assert "3 classes)" in report and "no-object" not in report
    assert "adapted: class_embed.0, class_embed.1 .weight and .bias (3 class rows carried over)" in report
    assert "classes carried over (3): rectangle <- row 0, ellipse <- row 1, triangle <- row 2" in report
    assert "new classes (1): star" in report


def official_checkpoint(path: Path, **options) -> dict[str, torch.Tensor]:
    """A Deformable-DETR checkpoint as its main.py writes it: the model's state under "model" (random values,
    91 COCO class rows), the optimizer's and the argparse arguments beside it."""
    head = {
        "_target_": "detr_backbone.detection.deformable.build_deformable_detr",
        "num_queries": 6,
        "enc_layers": 1,
        "dec_layers": 2,
        "dim_feedforward": 64,
        "num_feature_levels": 3,
        **options,
    }
    joiner = {"backbone": {"name": "resnet18", "pretrained": False, "levels": [2, 3, 4]}, "hidden_dim": 32}
    detector = build_detector(joiner, head, 91)
    detector.load_state_dict(randomized(detector.state_dict(), seed=3))
    state = detector.state_dict()  # heads shared across decoder layers (no refinement) hold one tensor
    arguments = argparse.Namespace(lr=2e-4, backbone="resnet18", num_feature_levels=3, **options)
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 49, "args": arguments}, path)
    return state


OFFICIAL_RUN = [
    *TINY,
    *DEFORMABLE_HEAD,
    "model.num_queries=6",
    "trainer.max_steps=1",
    "callbacks.predictions.enabled=false",
    "test_after_fit=false",
]


@pytest.mark.parametrize(
    "options",
    [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}],
    ids=["plain", "box-refine", "two-stage"],
)
def test_deformable_detrs_checkpoint_onto_coco_named_classes(coco_folder, tmp_path, options):  # noqa: F811
    path = tmp_path / "r18_deformable_detr-checkpoint.pth"
    official = official_checkpoint(path, **options)
    switches = [f"model.{name}={str(value).lower()}" for name, value in options.items()]
    run = job(tmp_path / "run", *OFFICIAL_RUN, "data=coco", *coco_folder, *switches, f"init_from={path}")
    state = run.module.detector.state_dict()
    heads = class_keys(state)
    layers = 2 + bool(options.get("two_stage"))  # one head per decoder layer, + the proposals' with two-stage
    assert len({key.rsplit(".", 1)[0].removeprefix("transformer.decoder.") for key in heads}) == layers
    for key in heads:  # the dataset's labels follow its sorted category ids: 3 (Car), 7 (widget), 18 (dog)
        assert torch.equal(state[key][0], official[key][3]) and torch.equal(state[key][2], official[key][18])
        assert not any(torch.equal(state[key][1], row) for row in official[key])  # widget: fresh
    assert all(torch.equal(state[key], official[key]) for key in state if key not in heads)
    report = (tmp_path / "run" / REPORT_FILE).read_text()
    assert "source: Deformable-DETR checkpoint (resnet18, hidden_dim 32, 3 levels" in report
    assert "91 classes)" in report and "skipped: optimizer, epoch, args" in report
    assert "classes carried over (2): Car <- row 3 (car), dog <- row 18" in report


def test_a_two_stage_checkpoint_into_a_plain_config_names_the_switches(tmp_path):
    path = tmp_path / "two_stage.pth"
    official_checkpoint(path, with_box_refine=True, two_stage=True)
    with pytest.raises(CheckpointMismatchError) as error:
        job(tmp_path / "run", *OFFICIAL_RUN, f"init_from={path}")
    message = one_line(error)
    assert message.startswith(f"init_from='{path}' (Deformable-DETR checkpoint: resnet18, hidden_dim 32, 3 levels")
    assert message.endswith("a config that fits: model.with_box_refine=true model.two_stage=true")


@pytest.mark.slow
def test_another_heads_weights_are_refused_in_one_line(deformable_checkpoint, tmp_path):
    with pytest.raises(CheckpointMismatchError) as error:
        job(tmp_path / "detr", *TINY_RUN, "model=detr_small", f"init_from={deformable_checkpoint}")
    assert one_line(error) == (
        f"init_from='{deformable_checkpoint}' holds a deformable_detr detector (train.py checkpoint) but the run's "
        "model is detr: set model=deformable_detr (or a preset of it, e.g. model=deformable_detr_small)"
    )
    detr_file = tmp_path / "detr.pth"
    head = {"num_queries": 5, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64}
    joiner = {"backbone": {"name": "resnet18", "pretrained": False}, "hidden_dim": 32}
    torch.save({"model": build_detector(joiner, head, 91).state_dict()}, detr_file)
    with pytest.raises(CheckpointMismatchError) as error:
        job(tmp_path / "deformable", *OFFICIAL_RUN, f"init_from={detr_file}")
    assert one_line(error) == (
        f"init_from='{detr_file}' holds a detr detector (DETR checkpoint) but the run's model is deformable_detr: "
        "set model=detr (or a preset of it, e.g. model=detr_small)"
    )


def test_load_detector_runs_deformable_detrs_checkpoint(tmp_path):
    path = tmp_path / "r18_deformable_detr_refine-checkpoint.pth"
    official = official_checkpoint(path, with_box_refine=True)
    loaded = load_detector(path, dilation=False)
    assert isinstance(loaded.detector, DeformableDETR) and loaded.detector.with_box_refine
    assert loaded.class_names == list(COCO_NAMES) and loaded.category_ids == list(range(91))
    state = loaded.detector.state_dict()
    assert state.keys() == official.keys() and all(torch.equal(state[key], official[key]) for key in state)
    assert loaded.detector.backbone[1].offset == -0.5  # Deformable-DETR's sine encoding, from pixel centres


# --- Hugging Face Deformable DETR ------------------------------------------------------------


def hugging_face_deformable(folder: Path, **options) -> torch.nn.Module:
    """A DeformableDetrForObjectDetection with random weights (a timm ResNet-18), saved in the Hub's layout."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        backbone="resnet18",
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=6,
        num_feature_levels=3,
        id2label={0: "Rectangle", 1: "widget", 2: "star"},
        label2id={"Rectangle": 0, "widget": 1, "star": 2},
        **options,
    )
    model = transformers.DeformableDetrForObjectDetection(config)
    model.load_state_dict(randomized(model.state_dict(), seed=5))
    model.save_pretrained(folder)
    # what the folder holds, as transformers reads it back (it ties the class heads it saved once)
    return transformers.DeformableDetrForObjectDetection.from_pretrained(folder).eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different sizes in one batch: the second padded at its bottom and right."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 128, generator=generator)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 72:], mask[1, :, 100:] = True, True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


@pytest.mark.parametrize("options", [{}, {"with_box_refine": True}], ids=["plain", "box-refine"])
@pytest.mark.slow
def test_a_hugging_face_deformable_detr_gives_hugging_faces_outputs(tmp_path, options):
    model = hugging_face_deformable(tmp_path / "hf", **options)
    # the names transformers 5 holds in memory, in a weights file given alone beside its config.json
    (tmp_path / "in_memory").mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "in_memory")
    torch.save(model.state_dict(), tmp_path / "in_memory" / "weights.bin")
    images, mask = padded_batch()
    with torch.no_grad():
        theirs = model(pixel_values=images, pixel_mask=(~mask).long())
    for source, naming in (
        (tmp_path / "hf", "Hub names"),
        (tmp_path / "in_memory" / "weights.bin", "transformers 5 names"),
    ):
        loaded = load_detector(source)
        assert loaded.source == f"Hugging Face Deformable DETR ({naming})"
        assert loaded.class_names == ["Rectangle", "widget", "star"]
        with torch.no_grad():
            ours = loaded.detector(NestedTensor(images, mask))
        torch.testing.assert_close(ours["pred_logits"], theirs.logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours["pred_boxes"], theirs.pred_boxes, rtol=0, atol=1e-4)
        assert ours["pred_boxes"].std() > 0.01  # boxes that differ between queries: a test that can fail


HF_RUN = [
    *TINY,
    *DEFORMABLE_HEAD,
    "model.num_queries=6",
    "model.nheads=2",
    "data.classes=[rectangle,ellipse,star]",
    "trainer.max_steps=1",
    "callbacks.predictions.enabled=false",
    "test_after_fit=false",
]


def test_init_from_a_hugging_face_deformable_detr_carries_rows_by_id2label(tmp_path):
    model = hugging_face_deformable(tmp_path / "hf", with_box_refine=True)
    theirs = model.state_dict()
    run = job(tmp_path / "run", *HF_RUN, "model.with_box_refine=true", f"init_from={tmp_path / 'hf'}")
    state = run.module.detector.state_dict()
    heads = class_keys(state)
    assert heads == [f"class_embed.{i}.{kind}" for i in range(2) for kind in ("weight", "bias")]  # one per layer
    for key in heads:
        assert torch.equal(state[key][0], theirs[key][0]) and torch.equal(state[key][2], theirs[key][2])
        assert state[key][1].shape == theirs[key][1].shape and not torch.equal(state[key][1], theirs[key][1])
    assert state["class_embed.1.bias"][1].item() == pytest.approx(PRIOR_BIAS)  # ellipse: a fresh focal row
    report = run.init_report
    assert [str(c) for c in report.carried] == ["rectangle <- row 0 (Rectangle)", "star <- row 2"]
    assert report.source == "Hugging Face Deformable DETR (Hub names)" and report.new_classes == ["ellipse"]

    with pytest.raises(CheckpointMismatchError) as error:
        job(tmp_path / "plain", *HF_RUN, "hidden_dim=64", f"init_from={tmp_path / 'hf'}")
    assert one_line(error).endswith("a config that fits: hidden_dim=32 model.with_box_refine=true")
