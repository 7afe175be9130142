"""Synthetic shapes: the embedded default detection dataset (no files, no network).

Every image is a pure function of (seed, split, index), so workers, reruns and machines agree.
``python -m detr_backbone.data.shapes --format yolo|voc|coco <folder>`` writes them out as a folder
of that format (PNG images), a stand-in for your own data.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from .coco import write_coco
from .transforms import SampleTransform, Target, detection_target, detr_base_transforms
from .voc import write_voc
from .yolo import write_yolo

SHAPE_KINDS = ("rectangle", "ellipse", "triangle", "star", "cross")  # every kind that can be drawn
CLASSES = SHAPE_KINDS[:3]  # the default classes, in label order (the default job's)
SPLITS = ("train", "val", "test")

MIN_RELATIVE_SIZE, MAX_RELATIVE_SIZE = 0.2, 0.6  # shape side as a fraction of the image side
MAX_SIDE = 128  # the default largest image side
MAX_IOU = 0.3  # overlap allowed between a new shape and any earlier one
PLACEMENT_TRIES = 10
MIN_COLOR_DISTANCE = 150  # L1 over RGB between a shape and the background's base color
MAX_GRADIENT = 30.0  # largest color change across a graded background, far below MIN_COLOR_DISTANCE
STAR_POINTS, STAR_INNER_RADIUS = 5, 0.45  # inner vertices at this fraction of the outer radius
CROSS_ARM = (0.25, 0.45)  # range of the arms' thickness, as a fraction of the box side


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A plain or (half the time) linearly graded float canvas, and its base color."""
    base = rng.integers(0, 256, size=3).astype(np.float64)
    canvas = np.broadcast_to(base, (height, width, 3)).copy()
    if rng.random() < 0.5:
        angle = rng.uniform(0.0, 2 * math.pi)
        amplitude = rng.uniform(10.0, MAX_GRADIENT)
        ys, xs = np.mgrid[0:height, 0:width]
        ramp = math.cos(angle) * (xs / width - 0.5) + math.sin(angle) * (ys / height - 0.5)
        canvas += amplitude * ramp[..., None]
    return np.clip(canvas, 0, 255), base


def _contrasting_color(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    for _ in range(PLACEMENT_TRIES):
        color = rng.integers(0, 256, size=3)
        if np.abs(color - base).sum() >= MIN_COLOR_DISTANCE:
            return color
    return np.where(base > 127, 0, 255)  # the far corner of the RGB cube always contrasts


def _placement(rng: np.random.Generator, height: int, width: int, placed: list[Tensor]) -> Tensor | None:
    """An XYXY box fully inside the image that overlaps no earlier shape by more than MAX_IOU."""
    for _ in range(PLACEMENT_TRIES):
        box_h = int(rng.integers(round(MIN_RELATIVE_SIZE * height), round(MAX_RELATIVE_SIZE * height) + 1))
        box_w = int(rng.integers(round(MIN_RELATIVE_SIZE * width), round(MAX_RELATIVE_SIZE * width) + 1))
        top = int(rng.integers(0, height - box_h + 1))
        left = int(rng.integers(0, width - box_w + 1))
        box = torch.tensor([[left, top, left + box_w, top + box_h]], dtype=torch.float32)
        if not placed or box_iou(box, torch.cat(placed)).max() <= MAX_IOU:
            return box
    return None


def _shape_mask(rng: np.random.Generator, kind: str, box: Tensor, height: int, width: int) -> np.ndarray:
    """The pixels PIL fills for one shape inside ``box``, as a bool (height, width) mask."""
    left, top, right, bottom = (int(v) for v in box[0])
    right, bottom = right - 1, bottom - 1  # PIL's drawing boxes include their last pixel
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "rectangle":
        draw.rectangle((left, top, right, bottom), fill=255)
    elif kind == "ellipse":
        draw.ellipse((left, top, right, bottom), fill=255)
    elif kind == "triangle":  # its apex somewhere on the top or the bottom side
        apex_x = left + rng.uniform(0.0, 1.0) * (right - left)
        apex_y, base_y = (top, bottom) if rng.random() < 0.5 else (bottom, top)
        draw.polygon([(apex_x, apex_y), (left, base_y), (right, base_y)], fill=255)
    elif kind == "star":  # five points, one pointing up or down, stretched to fill the box
        draw.polygon(_star_outline(rng.random() < 0.5, left, top, right, bottom), fill=255)
    else:  # cross: a horizontal and a vertical bar through the box's centre
        arm_w = rng.uniform(*CROSS_ARM) * (right - left) / 2
        arm_h = rng.uniform(*CROSS_ARM) * (bottom - top) / 2
        middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
        draw.rectangle((left, middle_y - arm_h, right, middle_y + arm_h), fill=255)
        draw.rectangle((middle_x - arm_w, top, middle_x + arm_w, bottom), fill=255)
    return np.asarray(mask) > 0


def _star_outline(upward: bool, left: int, top: int, right: int, bottom: int) -> list[tuple[float, float]]:
    """The vertices of a five-pointed star whose outline spans exactly the box."""
    angles = np.pi / 2 + np.arange(2 * STAR_POINTS) * np.pi / STAR_POINTS
    radii = np.where(np.arange(2 * STAR_POINTS) % 2 == 0, 1.0, STAR_INNER_RADIUS)
    xs, ys = radii * np.cos(angles), -radii * np.sin(angles) * (1 if upward else -1)
    xs = left + (xs - xs.min()) / (xs.max() - xs.min()) * (right - left)
    ys = top + (ys - ys.min()) / (ys.max() - ys.min()) * (bottom - top)
    return list(zip(xs.tolist(), ys.tolist()))


def _tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


class ShapesDataset(Dataset):
    """Shapes (rectangles, ellipses and triangles by default) on plain or graded backgrounds, with exact tight boxes.

    ``classes`` picks the kinds drawn (any of ``SHAPE_KINDS``), in label order. With the default
    classes the images are those drawn before other kinds existed.

    Image height and width are drawn independently in [min_size, max_size], so batches carry real
    padding. Boxes are computed from each shape's own pixel mask; a later shape may hide part of an
    earlier one, whose box stays the full shape (as COCO boxes do for occluded objects).
    """

    num_classes = len(CLASSES)
    class_names = CLASSES

    def __init__(
        self,
        num_images: int,
        seed: int = 0,
        min_size: int = 96,
        max_size: int = MAX_SIDE,
        max_objects: int = 3,
        split: str = "train",
        noise: float = 3.0,
        transforms: SampleTransform | None = None,
        cache: bool = False,
        cache_samples: bool = False,
        classes: Sequence[str] = CLASSES,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"ShapesDataset split={split!r} is not one of {', '.join(SPLITS)}")
        if num_images < 0 or max_objects < 1 or noise < 0:
            raise ValueError(
                f"ShapesDataset needs num_images >= 0, max_objects >= 1 and noise >= 0, "
                f"got {num_images}, {max_objects} and {noise}"
            )
        if not 10 <= min_size <= max_size:
            raise ValueError(f"ShapesDataset needs 10 <= min_size <= max_size, got {min_size} and {max_size}")
        unknown = [kind for kind in classes if kind not in SHAPE_KINDS]
        if unknown or not classes or len(set(classes)) < len(classes):
            raise ValueError(
                f"data.classes={list(classes)} must name each shape at most once, from {', '.join(SHAPE_KINDS)}"
                + (f" (unknown: {', '.join(map(str, unknown))})" if unknown else "")
            )
        self.class_names = tuple(classes)
        self.num_classes = len(self.class_names)
        self.num_images = num_images
        self.seed = seed
        self.min_size = min_size
        self.max_size = max_size
        self.max_objects = max_objects
        self.split = split
        self.noise = noise  # std of the Gaussian pixel noise, in 0..255 levels
        self.transforms = transforms if transforms is not None else detr_base_transforms()
        # Rendering costs about 0.7 ms an image; with the cache each one is drawn once per process
        # (kept as uint8 pixels: a 96 x 96 image is 27 KB) and later epochs only transform it. Transforms
        # that draw nothing at random (no augmentation) take about 0.5 ms more an image; cache_samples keeps
        # their output too (float32: a 64 x 64 image is 48 KB), which a batch of 16 then serves in a millisecond.
        self._rendered: dict[int, tuple[np.ndarray, Target]] | None = {} if cache else None
        self._samples: dict[int, tuple[Tensor, Target]] | None = {} if cache and cache_samples else None

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if self._samples is None:
            return self.transforms(*self.render(index))
        if index not in self._samples:
            self._samples[index] = self.transforms(*self.render(index))
        image, target = self._samples[index]  # copies: a caller writing into a sample cannot change the cache
        return image.clone(), {
            key: value.clone() if isinstance(value, Tensor) else value for key, value in target.items()
        }

    def render(self, index: int) -> tuple[Image.Image, Target]:
        """The untransformed sample: a PIL image and absolute XYXY boxes of its shapes."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"ShapesDataset index {index} out of range for {self.num_images} images")
        if self._rendered is None:
            return self._draw(index)
        if index not in self._rendered:
            image, target = self._draw(index)
            self._rendered[index] = np.asarray(image), target
        pixels, target = self._rendered[index]
        return Image.fromarray(pixels), {key: value.clone() for key, value in target.items()}

    def _draw(self, index: int) -> tuple[Image.Image, Target]:
        # One independent stream per (seed, split, index): reproducible in any order and any worker.
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        height, width = (int(side) for side in rng.integers(self.min_size, self.max_size + 1, size=2))
        canvas, base_color = _background(rng, height, width)

        boxes: list[list[int]] = []
        labels: list[int] = []
        placed: list[Tensor] = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            placement = _placement(rng, height, width, placed)
            if placement is None:
                continue
            label = int(rng.integers(self.num_classes))
            mask = _shape_mask(rng, self.class_names[label], placement, height, width)
            canvas[mask] = _contrasting_color(rng, base_color)
            placed.append(placement)
            boxes.append(_tight_box(mask))
            labels.append(label)

        if self.noise > 0:
            canvas = np.clip(canvas + rng.normal(0.0, self.noise, canvas.shape), 0, 255)
        image = Image.fromarray(np.round(canvas).astype(np.uint8))
        target = detection_target(torch.tensor(boxes), torch.tensor(labels), index, height, width)
        return image, target


FOLDER_WRITERS = {"yolo": write_yolo, "voc": write_voc, "coco": write_coco}


def write_shapes(folder: str | Path, layout: str, train_size: int, val_size: int, **options) -> None:
    """The train and val splits of the shapes data (``options``: ShapesDataset's) as a ``layout`` folder."""
    sizes = {"train": train_size, "val": val_size}
    datasets = {split: ShapesDataset(size, split=split, **options) for split, size in sizes.items()}
    samples = {split: map(data.render, range(len(data))) for split, data in datasets.items()}
    FOLDER_WRITERS[layout](Path(folder), samples, datasets["train"].class_names)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detr_backbone.data.shapes", description="Write the shapes data out as a folder."
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--format", choices=tuple(FOLDER_WRITERS), required=True)
    parser.add_argument("--train-size", type=int, required=True, help="images of the train split")
    parser.add_argument("--val-size", type=int, required=True, help="images of the val split")
    for key, kind in (("seed", int), ("min_size", int), ("max_size", int), ("max_objects", int)):
        parser.add_argument("--" + key.replace("_", "-"), type=kind, help=f"data.{key} (ShapesDataset's default)")
    parser.add_argument("--classes", nargs="+", help=f"the kinds drawn, in label order, from {', '.join(SHAPE_KINDS)}")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = argument_parser()
    arguments = vars(parser.parse_args(argv))
    folder, layout = arguments.pop("folder"), arguments.pop("format")
    try:
        write_shapes(folder, layout, **{key: value for key, value in arguments.items() if value is not None})
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {arguments['train_size']} train and {arguments['val_size']} val images to {folder} ({layout})")


if __name__ == "__main__":
    main()
