"""What a user sees: the per-part parameter summary, the validation prediction grids, the render command."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detr_backbone.commands.render import compose_config as render_config
from detr_backbone.commands.render import load_joiner
from detr_backbone.commands.render import main as render_main
from detr_backbone.data import IMAGENET_MEAN, IMAGENET_STD, ShapesDataset
from detr_backbone.data.visualize import NEGATIVE, POSITIVE, PREDICTION_COLOR, TRUTH_COLOR, heatmap
from detr_backbone.training.callbacks.model_summary import ParameterSummary, count_parts, format_counts
from detr_backbone.training.callbacks.prediction_grid import PredictionGrid, prediction_panel
from detr_backbone.training.job import Job, validated

from .jobs import TINY, compose_config

RENDER_MODEL = ["backbone=resnet18", "hidden_dim=32", "data.min_size=64", "data.max_size=80"]


def job(tmp_path: Path, *overrides: str) -> Job:
    return Job(validated(compose_config(*TINY, *overrides)), tmp_path)


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --- parameter summary -----------------------------------------------------------------------


def independent_counts(module) -> dict[str, tuple[int, int]]:
    parts = {"0": "backbone body", "1": "positional table"}
    counts: dict[str, list[int]] = {}
    for name, parameter in module.named_parameters():
        _, child, rest = name.split(".", 2)
        part = parts[rest.split(".")[0]] if child == "backbone" else child
        counts.setdefault(part, [0, 0])[0 if parameter.requires_grad else 1] += parameter.numel()
    return {part: tuple(value) for part, value in counts.items()}


RESNET18_STEM_AND_LAYER1 = 64 * 3 * 7 * 7 + 4 * 64 * 64 * 3 * 3  # conv1 and layer1's four 3x3 convs
RESNET18_FROZEN_BN_ELEMENTS = 4 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512)  # 20 frozen BNs, 4 buffers each


@pytest.mark.parametrize(
    "overrides, body_frozen, table",
    [
        ([], RESNET18_STEM_AND_LAYER1, (0, 0)),  # DETR's rule: stem and layer1 frozen; sine has no table
        (["lr_backbone=0", "position=learned", "position.lr=1e-4"], None, (2 * 50 * 16, 0)),
        (["freeze_backbone=true", "position=learned"], None, (0, 2 * 50 * 16)),
    ],
)
def test_part_counts_match_an_independent_count(tmp_path, overrides, body_frozen, table):
    module = job(tmp_path, *overrides).module
    rows = {row.part: row for row in count_parts(module)}
    expected = independent_counts(module)
    assert list(rows) == [
        "backbone body",
        "positional table",
        "transformer",
        "input_proj",
        "query_embed",
        "class_embed",
        "bbox_embed",
        "other",
        "total",
    ]
    for part, (trainable, frozen) in expected.items():
        assert (rows[part].trainable, rows[part].frozen) == (trainable, frozen), part
    body_params = sum(p.numel() for p in module.detector.backbone[0].parameters())
    body_frozen = body_params if body_frozen is None else body_frozen
    assert (rows["backbone body"].trainable, rows["backbone body"].frozen) == (body_params - body_frozen, body_frozen)
    assert rows["backbone body"].buffers == RESNET18_FROZEN_BN_ELEMENTS
    assert (rows["positional table"].trainable, rows["positional table"].frozen) == table
    assert (rows["query_embed"].trainable, rows["class_embed"].trainable) == (5 * 32, 32 * (3 + 1) + 3 + 1)
    assert rows["other"].buffers == 3 + 1  # the criterion's class weights
    total = rows["total"]
    assert total.trainable + total.frozen == sum(p.numel() for p in module.parameters())
    assert total.trainable == sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_summary_table_text():
    module = torch.nn.Module()
    module.detector = torch.nn.Module()
    module.detector.class_embed = torch.nn.Linear(1000, 3)
    module.detector.class_embed.bias.requires_grad_(False)
    lines = format_counts(count_parts(module)).splitlines()
    assert lines[0].split() == ["part", "trainable", "frozen", "buffers"]
    assert lines[6].split() == ["class_embed", "3,000", "3", "0"]
    assert lines[-1].split() == ["total", "3,000", "3", "0"]
    assert set(lines[-2]) == {"-"}


# --- a short real fit: summary printed, grids written, TensorBoard image ---------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fit")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    lightning_log = logging.getLogger("pytorch_lightning")
    lightning_log.addHandler(handler)
    try:
        run = job(
            run_dir,
            "trainer.max_epochs=2",
            "test_after_fit=false",
            "logger=tensorboard",
            "callbacks.progress_bar=tqdm",
            "callbacks.predictions.score_threshold=0",
        )
        run.run()
    finally:
        lightning_log.removeHandler(handler)
    return SimpleNamespace(dir=run_dir, job=run, log="\n".join(records))


@pytest.mark.slow
def test_fit_prints_the_part_summary_and_shows_a_tqdm_bar(fitted):
    callbacks = fitted.job.trainer.callbacks
    assert any(isinstance(c, ParameterSummary) for c in callbacks)
    assert any(isinstance(c, TQDMProgressBar) for c in callbacks)
    assert fitted.log.count("Parameters by part:") == 1
    table = fitted.log.split("Parameters by part:\n")[1]
    body = next(line for line in table.splitlines() if line.startswith("backbone body")).split()
    expected = independent_counts(fitted.job.module)["backbone body"]
    assert [int(v.replace(",", "")) for v in body[2:4]] == list(expected)


def expected_grid_size(images: int, side: int) -> tuple[int, int]:
    """(height, width) of the grid of the first validation images, computed from the dataset's own image sizes."""
    dataset = ShapesDataset(4, min_size=64, max_size=80, split="val")
    sizes = []
    for index in range(images):
        width, height = dataset.render(index)[0].size
        scale = side / max(height, width)
        sizes.append((round(height * scale), round(width * scale)))
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    return height + 2 * 2, images * (width + 2) + 2


@pytest.mark.slow
def test_each_validation_writes_a_grid_but_the_sanity_check_does_not(fitted):
    written = sorted(p.name for p in (fitted.dir / "predictions").iterdir())
    assert written == ["epoch000.png", "epoch001.png"]
    grid = png(fitted.dir / "predictions" / "epoch001.png")
    assert grid.shape[:2] == expected_grid_size(4, 256)
    # score_threshold=0 draws every query's box: the prediction colour is on the grid, and the truth colour too
    flat = grid.reshape(-1, 3)
    assert (flat == PREDICTION_COLOR).all(1).sum() > 100
    assert (flat == TRUTH_COLOR).all(1).sum() > 100


@pytest.mark.slow
def test_tensorboard_gets_the_grid(fitted):
    events = EventAccumulator(str(fitted.dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "val/predictions" in events.Tags()["images"]
    images = events.Images("val/predictions")
    assert len(images) == 2
    assert (images[-1].height, images[-1].width) == expected_grid_size(4, 256)


@pytest.mark.slow
def test_the_grid_is_written_by_global_zero_only(tmp_path, fitted):
    callback = PredictionGrid(tmp_path / "predictions", num_images=1)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=False, current_epoch=0)
    callback.on_validation_epoch_end(trainer, fitted.job.module)
    assert not (tmp_path / "predictions").exists()


@pytest.mark.slow
def test_ddp_draws_on_global_zero_only(ddp_run):
    # train.py on two CPU processes for two epochs (conftest.py), the run test_distributed.py checks too
    assert ddp_run.result.returncode == 0, ddp_run.result.stderr
    output = ddp_run.result.stdout + ddp_run.result.stderr
    assert "GLOBAL_RANK: 1" in output and output.count("Parameters by part:") == 1
    assert sorted(p.name for p in (ddp_run.dir / "predictions").iterdir()) == ["epoch000.png", "epoch001.png"]


# --- one panel, pixel by pixel -----------------------------------------------------------------


def normalized(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels.float() / 255 - mean) / std


def test_panel_undoes_normalization_crops_padding_and_draws_boxes_above_threshold():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(40, 200, (3, 60, 80), dtype=torch.uint8, generator=generator)
    padded = torch.full((3, 90, 100), 7.0)  # padding the model saw: must not reach the panel
    padded[:, :60, :80] = normalized(pixels)
    target = {"size": torch.tensor([60, 80]), "boxes": torch.tensor([[0.25, 0.5, 0.25, 0.5]])}  # x 10..30, y 15..45
    detection = {
        "scores": torch.tensor([0.9, 0.2]),
        "labels": torch.tensor([1, 2]),
        "boxes": torch.tensor([[40.0, 10.0, 70.0, 50.0], [45.0, 20.0, 60.0, 55.0]]),
    }
    panel = prediction_panel(padded, target, detection, ("rectangle", "ellipse", "triangle"), 0.5, side=80)
    assert panel.shape == (3, 60, 80) and panel.dtype == torch.uint8
    assert panel[:, 30, 10].tolist() == list(TRUTH_COLOR)  # left edge of the ground-truth box
    assert panel[:, 30, 40].tolist() == list(PREDICTION_COLOR)  # left edge of the detection scoring 0.9
    assert torch.equal(panel[:, 52, 45], pixels[:, 52, 45])  # the 0.2 detection is below the threshold
    untouched = torch.ones(60, 80, dtype=torch.bool)
    untouched[14:47, 9:32] = False
    untouched[9:52, 39:72] = False
    untouched[9:28, 39:] = False  # the caption "ellipse 0.90" and its background run past the box's right edge
    assert torch.equal(panel[:, untouched], pixels[:, untouched])
    doubled = prediction_panel(padded, target, detection, None, 0.5, side=160)
    assert doubled.shape == (3, 120, 160)
    assert doubled[:, 60, 20].tolist() == list(TRUTH_COLOR)


def test_heatmap_colours():
    signed = heatmap(torch.tensor([[-2.0, 0.0, 2.0, 1.0]]), (1, 4), signed=True)
    assert signed[:, 0, 0].tolist() == [round(255 * c) for c in NEGATIVE]
    assert signed[:, 0, 1].tolist() == [255, 255, 255]
    assert signed[:, 0, 2].tolist() == [round(255 * c) for c in POSITIVE]
    assert signed[:, 0, 3].tolist() == [round(255 * (1 - 0.5 * (1 - c))) for c in POSITIVE]
    plain = heatmap(torch.tensor([[1.0, 3.0], [2.0, 5.0]]), (4, 4))
    assert plain[0].tolist() == [[0, 0, 128, 128], [0, 0, 128, 128], [64, 64, 255, 255], [64, 64, 255, 255]]


# --- config ------------------------------------------------------------------------------------


def test_bad_prediction_settings_name_the_key():
    with pytest.raises(ValueError, match=r"callbacks.predictions.num_images=0 must be >= 1"):
        validated(compose_config(*TINY, "callbacks.predictions.num_images=0"))
    with pytest.raises(ValueError, match=r"callbacks.predictions.score_threshold=1.5 must be in \[0, 1\]"):
        validated(compose_config(*TINY, "callbacks.predictions.score_threshold=1.5"))


def test_rich_bar_needs_rich(tmp_path):
    if _RICH_AVAILABLE:
        assert job(tmp_path, "callbacks.progress_bar=rich").trainer.progress_bar_callback is not None
    else:
        with pytest.raises(ValueError, match="needs the rich package"):
            validated(compose_config(*TINY, "callbacks.progress_bar=rich"))


def test_no_progress_bar_means_none_at_all(tmp_path):
    assert job(tmp_path, "callbacks.progress_bar=none").trainer.progress_bar_callback is None
    assert isinstance(job(tmp_path, "callbacks.progress_bar=tqdm").trainer.progress_bar_callback, TQDMProgressBar)


# --- the render command ------------------------------------------------------------------------


def test_render_a_shapes_sample_with_a_fresh_model(tmp_path):
    # DINO's input record: the sample as drawn (the default RT-DETRv2's would be the 80x80 square)
    paths = render_main([f"output_dir={tmp_path}", *RENDER_MODEL, "model=dino_small"])
    assert [p.name for p in paths] == ["input.png", "position.png", "features.png"]
    width, height = ShapesDataset(1, min_size=64, max_size=80, split="val").render(0)[0].size
    assert png(tmp_path / "input.png").shape == (height, width, 3)
    position = png(tmp_path / "position.png")
    # hidden_dim=32: 16 channels per axis, 8 sin/cos pairs; pairs 0, 1, 2, 4, 7 shown per axis
    tile = (position.shape[1] - 2) // 5 - 2
    rows = (position.shape[0] - 2) // 2 - 2
    assert position.shape[1] == 5 * (tile + 2) + 2
    below_caption = slice(20, rows)
    for column in range(5):
        left = 2 + column * (tile + 2)
        y_tile = position[2 : 2 + rows, left : left + tile][below_caption]
        x_tile = position[2 + rows + 2 : 2 + 2 * rows + 2, left : left + tile][below_caption]
        assert (y_tile == y_tile[:, :1]).all()  # the y channels change down the image only
        assert (x_tile == x_tile[:1]).all()  # the x channels across it only
    features = png(tmp_path / "features.png")  # one row: input, mean, norm and the six top channels
    tile_height, tile_width = features.shape[0] - 4, (features.shape[1] - 2) / 9 - 2
    assert tile_width == int(tile_width) and max(tile_height, tile_width) == 128


def test_render_an_image_file(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(70, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    render_main([f"image={tmp_path / 'photo.png'}", f"output_dir={tmp_path / 'out'}", *RENDER_MODEL])
    assert np.array_equal(png(tmp_path / "out" / "input.png"), pixels)


def test_render_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: image file not found: .*missing\.png$"):
        render_main([f"image={tmp_path / 'missing.png'}", f"output_dir={tmp_path}", *RENDER_MODEL])
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        SystemExit, match=r"^error: .*garbage\.ckpt is not a Lightning checkpoint of train.py's DetrModule"
    ):
        render_main([f"ckpt_path={tmp_path / 'garbage.ckpt'}", f"output_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"^error: checkpoint file not found: .*none\.ckpt$"):
        render_main([f"ckpt_path={tmp_path / 'none.ckpt'}", f"output_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"^error: ckpt_path rebuilds the model .*; drop backbone=resnet50$"):
        render_main([f"ckpt_path={tmp_path / 'garbage.ckpt'}", "backbone=resnet50"])
    with pytest.raises(SystemExit, match=r"^error: top_k=0 must be >= 1$"):
        render_main(["top_k=0", *RENDER_MODEL])
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_render_from_a_training_checkpoint(tmp_path, fitted):
    ckpt = fitted.dir / "checkpoints" / "last.ckpt"
    paths = render_main([f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "data.min_size=64", "data.max_size=80"])
    assert all(p.stat().st_size > 0 for p in paths)
    joiner, _ = load_joiner(render_config([]), str(ckpt))
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in joiner.state_dict().items():
        assert torch.equal(value, saved[f"detector.backbone.{key}"]), key
