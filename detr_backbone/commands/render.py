"""Render what the Joiner computes for one image: its positional encodings and backbone feature maps.

    python -m detr_backbone render --out render                        # a validation sample, a fresh model
    python -m detr_backbone render --image photo.jpg --out render backbone=resnet50 position=learned
    python -m detr_backbone render --ckpt outputs/<run>/checkpoints/last.ckpt --out render

Writes ``input.png`` (the image as the model sees it), ``position.png`` (a few channels of each
axis of the positional map of every returned level: low to high frequency for the sine encoding)
and ``features.png`` (per level: the input, the channel mean and the channel L2 norm of the feature
map, then its top-k channels by energy), all cropped to the unpadded region. Trailing ``key=value``
arguments are Hydra overrides of conf/config.yaml, as for train.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import Tensor

from ..config import JoinerConfig
from ..data import build_datamodule
from ..data.coco import load_rgb_image
from ..data.visualize import caption, denormalize, heatmap, resize_longer_side, save_png, tile_grid, valid_size
from ..inference.preprocess import EvalTransform
from ..joiner import Joiner, build_backbone
from ..nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from ..position_encoding import PositionEmbeddingSine
from ..training.config import Config, register_configs
from ..training.job import validated
from ..training.module import load_training_module
from .cli import CONF_DIR, USER_ERRORS

# overrides that shape the model; with --ckpt the checkpoint's own saved config decides those
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


def compose_config(overrides: Sequence[str]) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validated(compose(config_name="config", overrides=list(overrides)))


def load_joiner(cfg: Config, ckpt: str | None) -> Joiner:
    """The Joiner of a train.py checkpoint, or a freshly built one from the config (seeded by ``cfg.seed``)."""
    if ckpt is None:
        torch.manual_seed(cfg.seed)
        return build_backbone(JoinerConfig(cfg.backbone, cfg.position, cfg.hidden_dim, cfg.lr_backbone))
    return load_training_module(ckpt).detector.backbone


def model_input(cfg: Config, image: str | None, index: int) -> Tensor:
    """A normalized (3, H, W) image: the file at ``image``, else validation sample ``index`` of the configured data."""
    if image is not None:
        return EvalTransform()(load_rgb_image(Path(image)))[0]
    dataset = build_datamodule(cfg.data).dataset("val")
    if not 0 <= index < len(dataset):
        raise ValueError(f"--index {index} is out of range: the validation set has {len(dataset)} images")
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


def render(joiner: Joiner, image: Tensor, out: Path, channels: int = 6, top_k: int = 6, side: int = 128) -> list[Path]:
    """Writes input.png, position.png and features.png under ``out``; returns their paths."""
    joiner.eval()
    with torch.no_grad():
        features, positions = joiner(nested_tensor_from_tensor_list([image]))
    pixels = denormalize(image)
    return [
        save_png(pixels, out / "input.png"),
        save_png(position_grid(joiner[1], positions, features, channels, side), out / "position.png"),
        save_png(feature_grid(pixels, features, top_k, side), out / "features.png"),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m detr_backbone render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", help="an image file; default: a validation sample of the configured data")
    parser.add_argument("--index", type=int, default=0, help="which validation sample when no --image is given")
    parser.add_argument("--ckpt", help="a checkpoint written by train.py; default: a freshly built model")
    parser.add_argument("--out", default="render", help="output folder (default: render)")
    parser.add_argument("--channels", type=int, default=6, help="positional channels shown per axis (default 6)")
    parser.add_argument("--top-k", type=int, default=6, help="feature channels shown per level (default 6)")
    parser.add_argument("--tile", type=int, default=128, help="longer side of each tile in pixels (default 128)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml, e.g. backbone=resnet50")
    args = parser.parse_args(argv)
    for name in ("channels", "top_k", "tile"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    shaping = [o for o in args.overrides if o.lstrip("+~").split("=")[0].split(".")[0] in MODEL_KEYS]
    if args.ckpt and shaping:
        parser.error(f"--ckpt rebuilds the model from the checkpoint's saved config; drop {' '.join(shaping)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    try:
        cfg = compose_config(args.overrides)
        joiner = load_joiner(cfg, args.ckpt)
        image = model_input(cfg, args.image, args.index)
        paths = render(joiner, image, Path(args.out), args.channels, args.top_k, args.tile)
    except USER_ERRORS as error:
        raise SystemExit(f"error: {str(error).splitlines()[0]}") from None
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
