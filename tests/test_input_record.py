"""The detector's input record (``model.input``): how its images are prepared, saved with it, honoured by the
data pipeline, the Predictor and export."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from detr_backbone.commands.evaluate import EvaluateConfig, evaluate
from detr_backbone.data import ShapesDataset, build_datamodule
from detr_backbone.detection import detector_config
from detr_backbone.image_input import InputConfig
from detr_backbone.inference import Predictor, load_detector
from detr_backbone.inference.checkpoint import RUN_CONFIG_KEY
from detr_backbone.inference.export import (
    ExportableDetector,
    Tolerance,
    example_batch,
    export_detector,
    export_metadata,
)
from detr_backbone.inference.exported import ExportedPredictor
from detr_backbone.training.job import build_module, validated

from .jobs import TINY, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def unnormalised_square(image: Image.Image, side: int) -> torch.Tensor:
    """Independently of the pipeline: PIL's bilinear resize to side x side, pixels / 255."""
    return TF.pil_to_tensor(image.resize((side, side), Image.Resampling.BILINEAR)).float() / 255


RTDETR_INPUT = ["model.input.normalize=false", "model.input.resize=square"]
SIDE = 80  # TINY's data.max_size: the shapes data's square side


@pytest.fixture(scope="module")
def square_config():
    return validated(compose_config(*TINY, *RTDETR_INPUT))


@pytest.fixture(scope="module")
def square_checkpoint(square_config, tmp_path_factory):
    """A train.py checkpoint's content (hyperparameters, detector state, run config) of an untrained detector whose
    record says RT-DETR's preparation; written and read as plain values, as train.py's are."""
    torch.manual_seed(0)
    module = build_module(square_config, 3, ["rectangle", "ellipse", "triangle"])
    path = tmp_path_factory.mktemp("square") / "last.ckpt"
    content = {
        "hyper_parameters": dict(module.hparams),
        "state_dict": module.state_dict(),
        RUN_CONFIG_KEY: OmegaConf.to_container(OmegaConf.structured(square_config)),
    }
    torch.save(content, path)
    return path


def test_the_command_line_sets_the_record_and_a_bad_value_is_named():
    default = validated(compose_config(*TINY)).model.input
    assert default == InputConfig(normalize=True, resize="shorter_side")  # DETR's
    assert validated(compose_config(*TINY, *RTDETR_INPUT)).model.input == InputConfig(False, "square")
    with pytest.raises(ValueError, match=r"model.input.resize='crop' is not one of shorter_side, square"):
        validated(compose_config(*TINY, "model.input.resize=crop"))


def test_a_saved_record_loads_back_and_an_old_checkpoint_gets_detrs(square_checkpoint):
    loaded = load_detector(square_checkpoint)  # weights_only: the record is plain values
    assert loaded.input == InputConfig(normalize=False, resize="square")
    assert loaded.size == SIDE  # the run's square side
    saved = torch.load(square_checkpoint, weights_only=True)["hyper_parameters"]
    assert saved["head"]["input"] == {"normalize": False, "resize": "square"}
    older = {key: value for key, value in saved["head"].items() if key != "input"}  # written before the record
    config = detector_config(saved["joiner"], older, saved["num_classes"], saved["class_names"])
    assert config.head.input == InputConfig(normalize=True, resize="shorter_side")


def test_the_predictor_feeds_an_unnormalised_square_and_maps_boxes_back_per_axis(square_checkpoint):
    predictor = Predictor.from_checkpoint(square_checkpoint, threshold=0.0)
    image = ShapesDataset(1, min_size=100, max_size=100, split="test").render(0)[0].resize((200, 100))
    fed = []

    def fixed_boxes(module, inputs, outputs):
        fed.append(inputs[0].tensors[0].clone())
        # every query: centre (0.5, 0.25), size (0.2, 0.1) of the model input, whatever its shape
        return {**outputs, "pred_boxes": torch.tensor([0.5, 0.25, 0.2, 0.1]).expand_as(outputs["pred_boxes"])}

    handle = predictor.detector.register_forward_hook(fixed_boxes)
    try:
        found = predictor(image)
    finally:
        handle.remove()
    torch.testing.assert_close(fed[0], unnormalised_square(image, SIDE))
    assert found.image_size == (100, 200)
    # the square's normalised box in the original 200 x 100 pixels: x by 200, y by 100
    # x: (0.5 -+ 0.1) * 200 = 80, 120; y: (0.25 -+ 0.05) * 100 = 20, 30
    torch.testing.assert_close(found.boxes, torch.tensor([[80.0, 20.0, 120.0, 30.0]]).expand(len(found), 4))


def test_the_validation_loader_of_a_run_with_the_record_yields_unnormalised_squares(square_config):
    datamodule = build_datamodule(square_config.data, square_config.model.input)  # as the job builds it
    images, targets = next(iter(datamodule.val_dataloader()))
    assert images.tensors.shape[-2:] == (SIDE, SIDE) and not images.mask.any()
    raw = [val_image(square_config, int(target["image_id"])) for target in targets]
    assert any(image.size != (SIDE, SIDE) for image in raw)  # the resize is the pipeline's, not the data's
    for index, image in enumerate(raw):
        torch.testing.assert_close(images.tensors[index], unnormalised_square(image, SIDE))
    train_batch = next(iter(datamodule.train_dataloader()))[0]
    # training takes pixels / 255 on squares too (no augmentation on the shapes data: the resize alone)
    assert train_batch.tensors.shape[-2:] == (SIDE, SIDE) and not train_batch.mask.any()
    assert train_batch.tensors.min() >= 0 and train_batch.tensors.max() <= 1
    detr = build_datamodule(square_config.data)  # no record: DETR's, normalised and not resized
    assert next(iter(detr.val_dataloader()))[0].tensors.min() < 0


def val_image(config, index: int) -> Image.Image:
    """The shapes run's validation image ``index``, as drawn."""
    data = config.data
    dataset = ShapesDataset(data.val_size, split="val", seed=data.seed, min_size=data.min_size, max_size=data.max_size)
    return dataset.render(index)[0]


def test_evaluate_prepares_its_own_split_as_the_predictor_does(square_checkpoint, square_config, tmp_path):
    """evaluate's validation batches follow the saved record: its detections of an image are the Predictor's."""
    evaluate(EvaluateConfig(ckpt_path=str(square_checkpoint), output_dir=str(tmp_path), progress=False), own_data=True)
    rows = [row for row in json.loads((tmp_path / "detections.json").read_text()) if row["image_id"] == 1]
    found = Predictor.from_checkpoint(square_checkpoint, threshold=0.0)(val_image(square_config, 1))
    assert len(rows) == len(found)
    evaluated = torch.tensor(sorted((row["score"], *row["bbox"]) for row in rows))
    xywh = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in found.boxes.tolist()]
    predicted = torch.tensor(sorted((score, *box) for score, box in zip(found.scores.tolist(), xywh)))
    # detections.json keeps scores to 1e-5 and boxes to a hundredth of a pixel
    torch.testing.assert_close(evaluated[:, 0], predicted[:, 0], atol=2e-5, rtol=0)
    torch.testing.assert_close(evaluated[:, 1:], predicted[:, 1:], atol=6e-3, rtol=0)


def test_export_metadata_says_what_input_the_file_takes(square_checkpoint):
    loaded = load_detector(square_checkpoint)
    metadata = export_metadata(loaded, ExportableDetector(loaded.detector), {})
    assert metadata["input"] == {"normalize": False, "resize": "square"}
    assert metadata["normalization"] == {"pixel_scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    assert metadata["resize"] == {"square": SIDE}
    assert "not normalised" in metadata["inputs"]["images"]
    images = example_batch(3, 64, 64, normalize=False)[0]  # the trace's and the check's batches: pixels / 255
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.slow
def test_an_exported_file_carries_the_record_to_whoever_runs_it(square_checkpoint, tmp_path):
    report = export_detector(
        load_detector(square_checkpoint),
        "torch_export",
        tmp_path / "square.pt2",
        postprocess=True,
        trace_size=(64, 80),
        check_size=(72, 64),
    )  # the check ran on images in [0, 1], as the detector takes them
    assert max(report.max_abs_diff.values()) <= Tolerance().atol
    exported = ExportedPredictor(report.path)
    assert exported.input == InputConfig(normalize=False, resize="square")
