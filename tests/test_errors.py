"""Bad input fails at once with one clear line that names the bad value and what would be valid."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_backbone import NestedTensor, PositionEmbeddingLearned, build_backbone
from detr_backbone.data.coco import CocoDetection, DegenerateBoxWarning
from detr_backbone.training.job import build_module, validated
from detr_backbone.weights import CheckpointMismatchError

from .jobs import ROOT, TINY, compose_config


def build(*overrides: str):
    """What train.py does before any training: validate the composed config, then build the model."""
    return build_module(validated(compose_config(*TINY, *overrides)), num_classes=3)


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["backbone._target_=detr_backbone.ResNet"],
            "backbone._target_='detr_backbone.ResNet' is not one of detr_backbone.Backbone, detr_backbone.GroupNormBackbone, detr_backbone.TimmBackbone, detr_backbone.ResNetVdBackbone",
        ),
        (
            ["position._target_=detr_backbone.Cosine"],
            "position._target_='detr_backbone.Cosine' is not one of detr_backbone.PositionEmbeddingSine, detr_backbone.PositionEmbeddingLearned",
        ),
        (
            ["model._target_=detr_backbone.detection.build_yolo"],
            "model._target_='detr_backbone.detection.build_yolo' is not one of detr_backbone.detection.build_detr, detr_backbone.detection.deformable.build_deformable_detr, detr_backbone.detection.dino.build_dino, detr_backbone.detection.rtdetrv2.build_rtdetrv2, detr_backbone.detection.dfine.build_dfine",
        ),
        (["lr_backbone=-0.001"], "lr_backbone=-0.001 must be >= 0 (0 freezes the backbone)"),
        (["hidden_dim=33"], "hidden_dim=33 must be a positive even number (half for rows, half for columns)"),
        (
            ["callbacks.checkpoint.every_n_train_steps=0"],
            "callbacks.checkpoint.every_n_train_steps=0 must be null (off) or > 0",
        ),
    ],
)
def test_bad_config_values_fail_validation_in_one_line(overrides, message):
    with pytest.raises(ValueError) as error:
        validated(compose_config(*TINY, *overrides))
    assert one_line_error(error) == message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["backbone.name=resnet51"],
            "unknown torchvision ResNet 'resnet51'; valid names: resnet18, resnet34, resnet50,",
        ),
        (
            ["backbone=timm", "backbone.name=convnext_tinyy"],
            "unknown timm model 'convnext_tinyy'; close names: convnext_tiny",
        ),
        (["backbone=resnet18_gn", "backbone.name=resnet51"], "unknown torchvision ResNet 'resnet51'"),
    ],
)
def test_unknown_model_names_fail_when_building_in_one_line(overrides, message):
    with pytest.raises(ValueError) as error:
        build(*overrides)
    assert one_line_error(error).startswith(message)


def test_misspelled_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ValueError) as error:
        build_backbone({"backbone": {"name": "resnet18", "dilaton": True}})
    message = one_line_error(error)
    assert (
        "Key 'dilaton' not in 'BackboneConfig'" in message
        and "valid keys: _target_, return_interm_layers," in message
        and " dilation," in message
    )


def test_learned_table_overflow_names_the_size_and_the_option():
    encoding = PositionEmbeddingLearned(8, num_embeddings=4)
    images = NestedTensor(torch.zeros(1, 16, 3, 6), torch.zeros(1, 3, 6, dtype=torch.bool))
    with pytest.raises(ValueError) as error:
        encoding(images)
    message = one_line_error(error)
    assert "6" in message and "position.num_embeddings to at least 6" in message


def test_mask_that_does_not_match_its_images():
    with pytest.raises(ValueError) as error:
        NestedTensor(torch.zeros(2, 3, 32, 48), torch.zeros(2, 32, 40, dtype=torch.bool))
    assert one_line_error(error).startswith(
        "NestedTensor mask of shape (2, 32, 40) does not match tensors of shape (2, 3, 32, 48)"
    )


@pytest.mark.parametrize("kind, name", [("torchvision", "resnet18"), ("timm", "efficientnet_b0")])
def test_images_with_the_wrong_number_of_channels(kind, name):
    joiner = build_backbone({"backbone": {"kind": kind, "name": name}, "hidden_dim": 16, "lr_backbone": 0.0})
    grey = NestedTensor(torch.zeros(1, 1, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError) as error:
        joiner(grey)
    assert one_line_error(error) == "the backbone takes images of shape (batch, 3, height, width), got (1, 1, 32, 32)"


# --- data ---------------------------------------------------------------------------------------


def coco_file(folder: Path, annotations: list[dict], name: str = "instances.json") -> Path:
    Image.new("RGB", (40, 30), (90, 120, 150)).save(folder / "a.png")
    path = folder / name
    content = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": annotations,
        "categories": [{"id": 5, "name": "box"}],
    }
    path.write_text(json.dumps(content))
    return path


def test_degenerate_boxes_are_dropped_with_a_counted_warning(tmp_path):
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 5, "bbox": [2, 3, 10, 8], "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 5, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
        {"id": 13, "image_id": 1, "category_id": 5, "bbox": [45, 5, 10, 10], "iscrowd": 0},  # right of the image
    ]
    dataset = CocoDetection(tmp_path, coco_file(tmp_path, annotations))
    with pytest.warns(DegenerateBoxWarning) as caught:
        _, target = dataset.load(0)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        f"{tmp_path / 'a.png'}: dropped 2 of 3 boxes with no area inside the 40x30 image (annotation ids [12, 13])"
    )
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0]]


def test_valid_boxes_raise_no_warning(tmp_path):
    annotations = [{"id": 11, "image_id": 1, "category_id": 5, "bbox": [2, 3, 10, 8], "iscrowd": 0}]
    dataset = CocoDetection(tmp_path, coco_file(tmp_path, annotations))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateBoxWarning)
        dataset.load(0)


def test_coco_folder_errors_name_the_file(tmp_path):
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"images": [{"id": 1,')
    with pytest.raises(ValueError) as error:
        CocoDetection(tmp_path, malformed)
    assert one_line_error(error).startswith(f"{malformed} is not valid JSON: ")
    dataset = CocoDetection(tmp_path, coco_file(tmp_path, []))
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(ValueError) as error:
        dataset.load(0)
    assert one_line_error(error).startswith(f"cannot read image {tmp_path / 'a.png'}: ")
    (tmp_path / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"image file not found: {tmp_path / 'a.png'}$"):
        dataset.load(0)


# --- checkpoints --------------------------------------------------------------------------------


@pytest.fixture
def resnet18_checkpoint(tmp_path) -> Path:
    joiner = build_backbone({"backbone": {"name": "resnet18"}, "hidden_dim": 32})
    path = tmp_path / "resnet18.pth"
    torch.save({"model": {f"backbone.{key}": value for key, value in joiner.state_dict().items()}}, path)
    return path


def test_backbone_checkpoint_with_missing_and_unexpected_keys(tmp_path, resnet18_checkpoint):
    state = torch.load(resnet18_checkpoint, weights_only=True)["model"]
    state.pop("backbone.0.body.layer4.1.conv2.weight")
    state["backbone.0.body.layer4.1.conv3.weight"] = torch.zeros(1)
    edited = tmp_path / "edited.pth"
    torch.save({"model": state}, edited)
    with pytest.raises(CheckpointMismatchError) as error:
        build(f"backbone.checkpoint={edited}")
    message = str(error.value)
    assert "missing from the checkpoint: backbone.0.body.layer4.1.conv2.weight" in message
    assert "unexpected in the checkpoint: backbone.0.body.layer4.1.conv3.weight" in message


def test_truncated_backbone_checkpoint(tmp_path, resnet18_checkpoint):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(resnet18_checkpoint.read_bytes()[:4096])
    with pytest.raises(ValueError) as error:
        build(f"backbone.checkpoint={truncated}")
    assert one_line_error(error).startswith(
        f"could not read checkpoint '{truncated}' with weights_only=True: the file is truncated"
    )


def test_resume_checkpoint_missing_or_truncated(tmp_path, resnet18_checkpoint):
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(ValueError) as error:
        validated(compose_config(*TINY, f"ckpt_path={missing}"))
    assert one_line_error(error).startswith(f"ckpt_path='{missing}' does not exist")
    truncated = tmp_path / "last.ckpt"
    truncated.write_bytes(resnet18_checkpoint.read_bytes()[:4096])
    with pytest.raises(ValueError) as error:
        validated(compose_config(*TINY, f"ckpt_path={truncated}"))
    assert one_line_error(error).startswith(f"ckpt_path='{truncated}' is not a complete checkpoint")


# --- train.py -----------------------------------------------------------------------------------


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, *overrides, f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )


@pytest.mark.slow
def test_train_py_reports_a_checkpoint_mismatch_in_one_line_without_traceback(tmp_path, resnet18_checkpoint):
    state = torch.load(resnet18_checkpoint, weights_only=True)["model"]
    state.pop("backbone.0.body.layer4.1.conv2.weight")
    torch.save({"model": state}, tmp_path / "edited.pth")
    result = run_train(tmp_path, f"backbone.checkpoint={tmp_path / 'edited.pth'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert re.sub(r"loaded \d+ tensors", "loaded N tensors", line) == (
        f"error: checkpoint does not fit the model (strict loading): {tmp_path / 'edited.pth'}: loaded N tensors, "
        "skipped 0 keys of other modules; missing from the checkpoint: backbone.0.body.layer4.1.conv2.weight"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing half-written


@pytest.mark.slow
def test_train_py_reports_a_misspelled_key_without_traceback(tmp_path):
    result = run_train(tmp_path, "backbone.dilaton=true")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Key 'dilaton' not in 'BackboneConfig'" in result.stderr
