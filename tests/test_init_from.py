"""init_from: a run's detector from DETR's checkpoints, Hugging Face DETR and train.py checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_backbone import NestedTensor
from detr_backbone.config import BackboneConfig, JoinerConfig
from detr_backbone.detection import DetrConfig, build_detector
from detr_backbone.detection.coco_names import COCO_NAMES, UNUSED
from detr_backbone.training.init_from import REPORT_FILE
from detr_backbone.training.job import Job, validated
from detr_backbone.training.module import DetrModule
from detr_backbone.weights import CheckpointMismatchError

from .jobs import SMALL, TINY, compose_config

# the Hugging Face model of these tests, and the overrides that build the same detector here
HF_ARCHITECTURE = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_queries": 5,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
}
HF_OVERRIDES = ["model.dec_layers=2", "model.nheads=2", "data.classes=[rectangle,ellipse]"]


def job(run_dir: Path, *overrides: str) -> Job:
    return Job(validated(compose_config(*overrides)), run_dir)


def randomized(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor replaced by random values, so a copied tensor is told from a fresh one.

    Matrices are scaled by their fan-in, and norm scales and variances lie in [0.5, 1.5], so that
    activations keep their size through the network and its outputs depend on the input.
    """
    generator = torch.Generator().manual_seed(seed)

    def random(key: str, shape: torch.Size) -> torch.Tensor:
        if len(shape) > 1:
            scale = 1.0 if "query" in key else shape[1:].numel() ** -0.5
            return torch.randn(shape, generator=generator) * scale
        if key.endswith(("weight", "running_var")):
            return torch.rand(shape, generator=generator) + 0.5
        return torch.randn(shape, generator=generator) * 0.1

    return {key: random(key, value.shape) for key, value in state.items()}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- COCO names ------------------------------------------------------------------------------


def test_coco_names_are_the_80_categories_at_their_ids():
    assert len(COCO_NAMES) == 91 and COCO_NAMES.count(UNUSED) == 11
    assert [COCO_NAMES[i] for i in (0, 1, 3, 12, 18, 44, 90)] == [
        UNUSED,
        "person",
        "car",
        UNUSED,
        "dog",
        "bottle",
        "toothbrush",
    ]
    assert len(set(COCO_NAMES) - {UNUSED}) == 80


# --- DETR's official checkpoints -------------------------------------------------------------


@pytest.fixture
def coco_folder(tmp_path: Path) -> list[str]:
    """A COCO-format folder whose categories are two COCO names (one in other case) and a new one."""
    Image.new("RGB", (40, 30), (90, 120, 200)).save(tmp_path / "a.png")
    annotations = tmp_path / "instances.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 18, "bbox": [4, 6, 10, 8], "area": 80, "iscrowd": 0}
                ],
                "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "Car"}, {"id": 7, "name": "widget"}],
            }
        )
    )
    return [
        f"data.{split}_{kind}={tmp_path if kind == 'images' else annotations}"
        for split in ("train", "val")
        for kind in ("images", "annotations")
    ]


def official_r50_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A file in the layout of DETR's detr-r50-e632da11.pth: every key of DETR R50, a 92-row class head."""
    detector = build_detector(JoinerConfig(backbone=BackboneConfig(name="resnet50"), hidden_dim=256), DetrConfig(), 91)
    state = randomized(detector.state_dict(), seed=1)
    assert len(state) == 458 and sum(key.startswith("backbone.0.body.") for key in state) == 265
    assert state["class_embed.weight"].shape == (92, 256)
    torch.save({"model": state}, path)
    return state


@pytest.mark.slow
def test_official_checkpoint_carries_coco_rows_by_name_and_every_other_tensor(tmp_path, coco_folder):
    source = official_r50_checkpoint(tmp_path / "detr-r50.pth")
    overrides = ["experiment=detr_r50_finetune", *coco_folder, "data.num_workers=0", "trainer.accelerator=cpu"]
    run = job(tmp_path / "run", *overrides, f"init_from={tmp_path / 'detr-r50.pth'}")
    fresh = job(tmp_path / "fresh", *overrides).module.detector.state_dict()  # the same seed, no init_from
    state = run.module.detector.state_dict()

    # labels in sorted category id order: Car (id 3) -> 0, widget (id 7) -> 1, dog (id 18) -> 2
    assert run.datamodule.class_names == ["Car", "widget", "dog"]
    for key in ("class_embed.weight", "class_embed.bias"):
        assert state[key].shape[0] == 4
        assert torch.equal(state[key][0], source[key][3])  # COCO id 3: car
        assert torch.equal(state[key][2], source[key][18])  # COCO id 18: dog
        assert torch.equal(state[key][3], source[key][91])  # no object
        assert torch.equal(state[key][1], fresh[key][1])  # the new class: as a fresh head
        assert not torch.equal(fresh[key][1], source[key][7])
    others = [key for key in source if not key.startswith("class_embed.")]
    assert len(others) == 456 and all(torch.equal(state[key], source[key]) for key in others)

    report = (tmp_path / "run" / REPORT_FILE).read_text()
    assert str(run.init_report) + "\n" == report
    assert (
        "source: DETR checkpoint (resnet50, hidden_dim 256, 6 encoder + 6 decoder layers, 100 queries, 91 classes + no-object)"
        in report
    )
    assert "loaded: 455 tensors as they are" in report
    assert "classes carried over (2): Car <- row 3 (car), dog <- row 18\n" in report
    assert "new classes (1): widget\n" in report
    assert "note: DETR checkpoints do not record dilation: this run uses dilation=false" in report


# --- Hugging Face DETR -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hugging_face_model(tmp_path_factory):
    """A random-weight ``DetrForObjectDetection`` (timm ResNet-18) saved three ways.

    ``save_pretrained`` writes the Hub's names (``conv_encoder``, ``out_proj``, ``fc1``); the state dict
    in memory has transformers 5's (``model.backbone.model``, ``o_proj``, ``mlp.fc1``), saved here as
    ``pytorch_model.bin`` and as ``model.safetensors`` beside the same config.json.
    """
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.DetrConfig(
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        backbone="resnet18",
        **HF_ARCHITECTURE,
        id2label={0: "Rectangle", 1: "ellipse"},
        label2id={"Rectangle": 0, "ellipse": 1},
    )
    model = transformers.DetrForObjectDetection(config).eval()
    # its own init leaves the outputs nearly constant; random weights make the comparison mean something
    model.load_state_dict(randomized(model.state_dict(), seed=2))
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "hub")
    for name in ("pytorch_model.bin", "model.safetensors"):
        folder = root / name.partition(".")[0]
        folder.mkdir()
        shutil.copy(root / "hub" / "config.json", folder / "config.json")
        state = {key: value.contiguous() for key, value in model.state_dict().items()}
        torch.save(state, folder / name) if name.endswith(".bin") else save_file(state, folder / name)
    return model, root


def padded_batch() -> NestedTensor:
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = mask[1, :, 80:] = True  # the second image is 64 x 80
    images[1][:, mask[1]] = 0
    return NestedTensor(images, mask)


@pytest.mark.parametrize(
    ("source", "naming"),
    [
        ("hub", "Hub names"),
        ("pytorch_model/pytorch_model.bin", "transformers 5 names"),
        ("model", "transformers 5 names"),
    ],
)
def test_hugging_face_detr_gives_the_same_outputs(tmp_path, hugging_face_model, source, naming):
    model, root = hugging_face_model
    run = job(tmp_path, *TINY, *HF_OVERRIDES, f"init_from={root / source}")
    assert run.init_report.source == f"Hugging Face DETR ({naming})"
    assert [str(c) for c in run.init_report.carried] == ["rectangle <- row 0 (Rectangle)", "ellipse <- row 1"]
    detector = run.module.detector.eval()
    batch = padded_batch()
    with torch.no_grad():
        ours = detector(batch)
        theirs = model(pixel_values=batch.tensors, pixel_mask=(~batch.mask).long())
        unmasked = detector(NestedTensor(batch.tensors, torch.zeros_like(batch.mask)))
    assert (ours["pred_logits"] - theirs.logits).abs().max() < 1e-4
    assert (ours["pred_boxes"] - theirs.pred_boxes).abs().max() < 1e-4
    # the comparison is not trivial: the padding changes the outputs, and they vary across the batch
    assert (unmasked["pred_logits"][1] - ours["pred_logits"][1]).abs().max() > 0.01
    assert (ours["pred_logits"][0] - ours["pred_logits"][1]).abs().max() > 0.1


@pytest.mark.slow
def test_sources_are_recognised_by_content_not_by_file_name(tmp_path, hugging_face_model, own_checkpoint):
    _, root = hugging_face_model
    shutil.copy(root / "hub" / "model.safetensors", tmp_path / "detr.ckpt")  # a safetensors file, misnamed
    shutil.copy(root / "hub" / "config.json", tmp_path / "config.json")
    shutil.copy(own_checkpoint, tmp_path / "model.safetensors")  # a train.py checkpoint, misnamed
    run = job(tmp_path / "hf", *TINY, *HF_OVERRIDES, f"init_from={tmp_path / 'detr.ckpt'}")
    assert run.init_report.source == "Hugging Face DETR (Hub names)"
    run = job(tmp_path / "own", *SMALL, f"init_from={tmp_path / 'model.safetensors'}")
    assert run.init_report.source == "train.py checkpoint" and len(run.init_report.carried) == 3


def test_hugging_face_config_mismatch_names_the_overrides_of_config_json(tmp_path, hugging_face_model):
    _, root = hugging_face_model
    with pytest.raises(CheckpointMismatchError) as error:
        job(tmp_path, *TINY, "data.classes=[rectangle,ellipse]", "hidden_dim=64", f"init_from={root / 'hub'}")
    message = one_line(error)
    assert "has shape (96, 32) in the checkpoint but (192, 64) in the model" in message
    assert message.endswith("a config that fits: hidden_dim=32 model.dec_layers=2 model.nheads=2")


# --- train.py checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory) -> Path:
    """The last.ckpt of a two-step train.py run on the default shapes classes."""
    run_dir = tmp_path_factory.mktemp("source")
    job(run_dir, *SMALL, "trainer.max_steps=2").run()
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_own_checkpoint_onto_other_classes_trains_and_reloads(tmp_path, own_checkpoint):
    source_path = own_checkpoint
    saved = torch.load(source_path, weights_only=True)
    assert saved["hyper_parameters"]["class_names"] == ["rectangle", "ellipse", "triangle"]
    source = {key.removeprefix("detector."): value for key, value in saved["state_dict"].items()}

    run = job(
        tmp_path / "run",
        *SMALL,
        "data.classes=[triangle,star,rectangle]",
        "trainer.max_steps=2",
        f"init_from={source_path}",
    )
    weight = run.module.detector.class_embed.weight.detach().clone()
    assert torch.equal(weight[0], source["class_embed.weight"][2])  # triangle
    assert torch.equal(weight[2], source["class_embed.weight"][0])  # rectangle
    assert torch.equal(weight[3], source["class_embed.weight"][3])  # no object
    assert not any(torch.equal(weight[1], row) for row in source["class_embed.weight"])  # star: fresh
    assert (
        run.init_report.new_classes == ["star"] and run.init_report.loaded == len(source) - 4
    )  # - empty_weight, - adapted
    assert run.init_report.skipped == ["criterion.empty_weight"]

    run.run()
    assert run.trainer.global_step == 2  # a new run: from step 0, not resumed
    reloaded = DetrModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert reloaded.hparams["class_names"] == ["triangle", "star", "rectangle"]
    trained = run.module.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in reloaded.state_dict().items())


@pytest.mark.slow
def test_checkpoint_without_class_names_still_loads_and_starts_every_class_row_fresh(tmp_path, own_checkpoint):
    saved = torch.load(own_checkpoint, weights_only=True)
    del saved["hyper_parameters"]["class_names"]  # as written before class names were saved
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    assert DetrModule.load_from_checkpoint(old, weights_only=True).hparams.get("class_names") is None

    run = job(tmp_path / "run", *SMALL, f"init_from={old}")
    assert run.init_report.carried == [] and run.init_report.new_classes == ["rectangle", "ellipse", "triangle"]
    assert "note: the checkpoint does not name its 3 classes: every class row starts fresh" in str(run.init_report)
    no_object = run.module.detector.class_embed.weight[-1]
    assert torch.equal(no_object, saved["state_dict"]["detector.class_embed.weight"][-1])


# --- bad input -------------------------------------------------------------------------------


HUB_KEYS = {
    "model.backbone.conv_encoder.model.conv1.weight": torch.zeros(1),
    "class_labels_classifier.weight": torch.zeros(1),
}


def tiny_detr_checkpoint(path: Path, backbone: str = "resnet18", num_queries: int = 5) -> None:
    joiner = JoinerConfig(backbone=BackboneConfig(name=backbone), hidden_dim=32)
    head = DetrConfig(num_queries=num_queries, enc_layers=1, dec_layers=1, dim_feedforward=64)
    torch.save({"model": build_detector(joiner, head, 91).state_dict()}, path)


def test_another_architectures_weights_fail_before_training_with_a_config_that_fits(tmp_path):
    tiny_detr_checkpoint(tmp_path / "r34.pth", backbone="resnet34")
    with pytest.raises(CheckpointMismatchError) as error:
        job(tmp_path, *TINY, f"init_from={tmp_path / 'r34.pth'}")
    message = one_line(error)
    assert message.startswith(f"init_from='{tmp_path / 'r34.pth'}' (DETR checkpoint: resnet34, hidden_dim 32,")
    assert "not in the configured detector: backbone.0.body.layer1.2.conv1.weight," in message
    assert message.endswith("a config that fits: backbone.name=resnet34")
    assert not (tmp_path / REPORT_FILE).exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda path: torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path / "w.pth"),
            "is not a detector checkpoint: expected a train.py checkpoint, a DETR checkpoint, a Hugging Face DETR "
            "folder or weights file, a Deformable-DETR checkpoint, a Hugging Face Deformable DETR folder or weights "
            "file, a DINO checkpoint, an RT-DETRv2 checkpoint, a Hugging Face RT-DETRv2 folder or weights file, a "
            "Hugging Face RT-DETR folder or weights file, a D-FINE checkpoint or a Hugging Face D-FINE folder or "
            "weights file",
        ),
        (
            lambda path: (path / "w.pth").mkdir(),
            "is a folder without model.safetensors or pytorch_model.bin and config.json",
        ),
        (
            lambda path: (path / "w.pth").mkdir() or (path / "w.pth" / "config.json").write_text("{}"),
            "is a folder without model.safetensors or pytorch_model.bin: ",
        ),
        (
            lambda path: torch.save(HUB_KEYS, path / "w.pth"),
            "has Hugging Face DETR weights but no config.json beside them",
        ),
        (lambda path: (path / "w.pth").write_text("not weights"), "could not read checkpoint"),
        (
            lambda path: tiny_detr_checkpoint(path / "w.pth", num_queries=3),
            "has 3 object queries but model.num_queries=5: set model.num_queries=3 or fewer",
        ),
        (lambda path: None, "does not exist"),
    ],
    ids=[
        "not-a-detector",
        "empty-folder",
        "folder-without-weights",
        "no-config",
        "not-weights",
        "fewer-queries",
        "missing",
    ],
)
def test_bad_init_from_fails_in_one_line(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        job(tmp_path, *TINY, f"init_from={tmp_path / 'w.pth'}")
    assert message in one_line(error)


def test_init_from_and_ckpt_path_exclude_each_other(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        validated(compose_config(*TINY, "init_from=weights.pth", f"ckpt_path={tmp_path / 'last.ckpt'}"))
    assert one_line(error).startswith("init_from='weights.pth' and ckpt_path=")
    assert "exclude each other" in one_line(error)
