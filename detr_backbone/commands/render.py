"""Render what the Joiner computes for one image: its positional encodings and backbone feature maps; or,
with ``kind=augment``, what the training augmentation makes of the data.

    detr-backbone render output_dir=render                        # a validation sample, a fresh model
    detr-backbone render image=photo.jpg output_dir=render backbone=resnet50 position=learned
    detr-backbone render ckpt_path=outputs/<run>/checkpoints/last.ckpt output_dir=render
    detr-backbone render kind=augment data.augment=deim output_dir=render   # augment.png

Writes ``input.png`` (the image as the model sees it), ``position.png`` (a few channels of each
axis of the positional map of every returned level: low to high frequency for the sine encoding)
and ``features.png`` (per level: the input, the channel mean and the channel L2 norm of the feature
map, then its top-k channels by energy), all cropped to the unpadded region. ``kind=augment`` writes
``augment.png`` instead: the first ``samples`` training samples with their boxes, as the model sees them, one
row per phase of the data's augmentation policy (data/augment.py). The keys below are the
command's own; every other ``key=value`` is a Hydra override of config.yaml, as for train.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from hydra import compose
from omegaconf import OmegaConf
from torch import Tensor

from ..config import JoinerConfig
from ..data import DetectionDataModule, build_datamodule
from ..data.images import load_rgb_image
from ..data.transforms import pixel_statistics
from ..data.visualize import (
    caption,
    denormalize,
    heatmap,
    resize_longer_side,
    save_png,
    target_panel,
    tile_grid,
    valid_size,
)
from ..image_input import InputConfig
from ..inference.preprocess import EvalTransform
from ..joiner import Joiner, build_backbone
from ..nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from ..position_encoding import PositionEmbeddingSine
from ..training.config import Config, register_configs
from ..training.job import validated
from ..training.module import load_training_module
from ..validation import require
from .cli import configs, override_key, reported, split_config_dir

# overrides that shape the model; with ckpt_path the checkpoint's own saved config decides those
MODEL_KEYS = (
    "backbone",
    "position",
    "hidden_dim",
    "lr_backbone",
    "dilation",
    "return_interm_layers",
    "freeze_backbone",
    "model",
)


KINDS = ("joiner", "augment")


@dataclass
class RenderOptions:
    kind: str = "joiner"  # joiner: input, position and features | augment: a grid of augmented training samples
    ckpt_path: Optional[str] = None  # a train.py checkpoint; null: a fresh model built from the overrides
    image: Optional[str] = None  # an image file; null: validation sample `index` of the configured data
    index: int = 0  # which validation sample when no image is given
    output_dir: str = "render"
    channels: int = 6  # positional channels shown per axis
    top_k: int = 6  # feature channels shown per level
    tile: int = 128  # longer side of each tile in pixels
    samples: int = 6  # kind=augment: training samples per row

    def __post_init__(self) -> None:
        require(self.kind in KINDS, f"kind={self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("channels", "top_k", "tile", "samples"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")


OPTIONS = tuple(option.name for option in fields(RenderOptions))


def compose_config(overrides: Sequence[str], config_dir: Optional[str] = None) -> Config:
    register_configs()
    with configs(config_dir, "render"):
        return validated(compose(config_name="config", overrides=list(overrides)))


def load_joiner(cfg: Config, ckpt: str | None) -> tuple[Joiner, InputConfig]:
    """The Joiner of a train.py checkpoint, or a freshly built one from the config (seeded by ``cfg.seed``), and
    how its detector takes its images."""
    if ckpt is None:
        torch.manual_seed(cfg.seed)
        return build_backbone(
            JoinerConfig(cfg.backbone, cfg.position, cfg.hidden_dim, cfg.lr_backbone)
        ), cfg.model.input
    module = load_training_module(ckpt)
    return module.detector.backbone, module.config.head.input


def model_input(cfg: Config, image: str | None, index: int, input: InputConfig) -> Tensor:
    """A (3, H, W) model input prepared as ``input`` says: the file at ``image`` (not resized), else validation
    sample ``index`` of the configured data."""
    if image is not None:
        return EvalTransform(input=input)(load_rgb_image(Path(image), as_viewed=True))[0]
    dataset = build_datamodule(cfg.data, input).dataset("val")
    if not 0 <= index < len(dataset):
        raise ValueError(f"index={index} is out of range: the validation set has {len(dataset)} images")
    return dataset[index][0]


def axis_channels(encoding: torch.nn.Module, channels: int, count: int) -> list[tuple[str, list[tuple[str, int]]]]:
    """For each axis, up to ``count`` (caption, channel index) pairs from its block of ``channels // 2``.

    The sine encoding stacks the y block before the x block; each interleaves sin (even) and cos
    (odd) channels whose frequency falls geometrically with the pair index, so only the first few
    pairs oscillate across the image: the sin channels of pairs 0, 1, 2, 4, 8, ... are shown. The
    learned encoding stacks the column (x) table first; its channels are shown evenly spread.
    """
    per_axis = channels // 2
    if isinstance(encoding, PositionEmbeddingSine):
        last = per_axis // 2 - 1
        pairs = sorted({0, *(min(2**i, last) for i in range(count - 1))})
        picked, axes = [(f"sin {pair}", 2 * pair) for pair in pairs], ("y", "x")
    else:
        spread = torch.linspace(0, per_axis - 1, min(count, per_axis)).round().long().tolist()
        picked, axes = [(f"ch{i}", i) for i in spread], ("x", "y")
    return [(axis, [(name, block * per_axis + i) for name, i in picked]) for block, axis in enumerate(axes)]


def fitted_size(height: int, width: int, side: int) -> tuple[int, int]:
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def position_grid(
    encoding: torch.nn.Module, positions: list[Tensor], features: list[NestedTensor], count: int, side: int
) -> Tensor:
    """Rows of positional channels: for each level, one row per axis (white 0, red +1, blue -1)."""
    tiles = []
    for level, (position, feature) in enumerate(zip(positions, features)):
        height, width = valid_size(feature.mask[0])
        size = fitted_size(height, width, side)
        for axis, picked in axis_channels(encoding, position.shape[1], count):
            for name, channel in picked:
                map_ = position[0, channel, :height, :width]
                tiles.append(caption(heatmap(map_, size, signed=True), f"L{level} {axis} {name}"))
    return tile_grid(tiles, nrow=len(tiles) // (2 * len(positions)))


def top_channels(feature: Tensor, k: int) -> list[int]:
    """The ``k`` channels of a (C, h, w) map with the largest L2 norm."""
    return feature.flatten(1).norm(dim=1).topk(min(k, len(feature))).indices.tolist()


def feature_grid(image: Tensor, features: list[NestedTensor], top_k: int, side: int) -> Tensor:
    """One row per level: the input, the channel mean, the channel L2 norm, then the top-k channels."""
    tiles = []
    for level, feature in enumerate(features):
        height, width = valid_size(feature.mask[0])
        values = feature.tensors[0, :, :height, :width].float()
        size = fitted_size(height, width, side)
        tiles.append(caption(resize_longer_side(image, side)[0], f"L{level} {height}x{width}"))
        tiles.append(caption(heatmap(values.mean(0), size), f"L{level} mean"))
        tiles.append(caption(heatmap(values.norm(dim=0), size), f"L{level} norm"))
        tiles += [caption(heatmap(values[c], size), f"L{level} ch{c}") for c in top_channels(values, top_k)]
    return tile_grid(tiles, nrow=len(tiles) // len(features))


def render(
    joiner: Joiner,
    image: Tensor,
    out: Path,
    channels: int = 6,
    top_k: int = 6,
    side: int = 128,
    normalized: bool = True,
) -> list[Path]:
    """Writes input.png, position.png and features.png under ``out`` for a model input (ImageNet-``normalized``
    or pixels / 255); returns their paths."""
    joiner.eval()
    with torch.no_grad():
        features, positions = joiner(nested_tensor_from_tensor_list([image]))
    pixels = denormalize(image, *pixel_statistics(normalized))
    return [
        save_png(pixels, out / "input.png"),
        save_png(position_grid(joiner[1], positions, features, channels, side), out / "position.png"),
        save_png(feature_grid(pixels, features, top_k, side), out / "features.png"),
    ]


def augment_grid(datamodule: DetectionDataModule, samples: int, side: int, normalized: bool = True) -> Tensor:
    """The first ``samples`` training samples with their boxes, one row per phase of the train set's policy
    (each drawn as in the first epoch of its phase), every tile scaled to ``side`` on its longer side."""
    dataset = datamodule.dataset("train")
    schedule = datamodule.augment_schedule
    names = datamodule.class_names
    tiles = []
    for phase in schedule.policy.phases:
        schedule.state.set(0, phase.start)
        for index in range(min(samples, len(dataset))):
            image, target = dataset[index]
            captions = [names[int(label)] for label in target["labels"]]
            panel, _ = target_panel(image, target, captions, side, normalized)
            tiles.append(caption(panel, f"{schedule.policy.name} from {phase.start:.2f}") if index == 0 else panel)
    return tile_grid(tiles, nrow=min(samples, len(dataset)))


def parse_args(arguments: Sequence[str]) -> tuple[RenderOptions, list[str], Optional[str]]:
    """The command's own keys, the Hydra overrides of config.yaml, and ``--config-dir``."""
    if any(argument in ("-h", "--help") for argument in arguments):
        listing = "\n".join(f"  {name}={getattr(RenderOptions, name)}" for name in OPTIONS)
        print(f"{__doc__.strip()}\n\nkeys (defaults):\n{listing}")
        raise SystemExit(0)
    config_dir, rest = split_config_dir(arguments)
    own = [argument for argument in rest if argument.split("=", 1)[0] in OPTIONS]
    overrides = [argument for argument in rest if argument not in own]
    options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RenderOptions), OmegaConf.from_dotlist(own)))
    shaping = [o for o in overrides if override_key(o).split(".")[0] in MODEL_KEYS]
    require(
        options.ckpt_path is None or not shaping,
        f"ckpt_path rebuilds the model from the checkpoint's saved config; drop {' '.join(shaping)}",
    )
    return options, overrides, config_dir


def main(argv: Sequence[str] | None = None) -> list[Path]:
    with reported():
        options, overrides, config_dir = parse_args(argv or [])
        cfg = compose_config(overrides, config_dir)
        if options.kind == "augment":
            record = cfg.model.input
            grid = augment_grid(build_datamodule(cfg.data, record), options.samples, options.tile, record.normalize)
            paths = [save_png(grid, Path(options.output_dir) / "augment.png")]
            print(paths[0])
            return paths
        joiner, record = load_joiner(cfg, options.ckpt_path)
        image = model_input(cfg, options.image, options.index, record)
        out = Path(options.output_dir)
        paths = render(joiner, image, out, options.channels, options.top_k, options.tile, record.normalize)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
