"""What every detection dataset read from files shares (COCO, YOLO, Pascal VOC): class names, the
transforms, unreadable images skipped or raised (``data.bad_samples``), and bad boxes dropped with
a warning that names where they are written."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import clip_boxes_to_image

from .bad_samples import REPLACES, check_bad_samples_action, load_or_replace
from .images import load_rgb_image, open_image
from .transforms import SampleTransform, Target, detection_target, detr_base_transforms


class DegenerateBoxWarning(UserWarning):
    """Boxes were dropped: without area (zero width or height, or wholly outside the image), of a class
    outside the dataset's, or written on a malformed line."""


@dataclass(frozen=True)
class BadBox:
    """A box left out, and why: ``line`` is the label file's line (1-based; a VOC object's start tag)."""

    line: int
    what: str


@dataclass
class LabelledImage:
    """One image's objects as its label file gives them, before the image is read."""

    image: Path
    boxes: Tensor  # (n, 4) float32: normalised cxcywh (YOLO) or absolute xyxy (VOC)
    labels: Tensor  # (n,) int64
    lines: list[int]  # where each box is written in its label file


def warn_of_bad_boxes(source: Path, bad: Sequence[BadBox], kept: int) -> None:
    if bad:
        lines = "; ".join(f"line {box.line}: {box.what}" for box in bad)
        warnings.warn(
            f"{source}: dropped {len(bad)} of {len(bad) + kept} boxes ({lines})", DegenerateBoxWarning, stacklevel=3
        )


def boxes_with_area(
    boxes: Tensor,
    labels: Tensor,
    size: tuple[int, int],
    image_id: int,
    path: Path,
    keys: Sequence[object],
    keys_are: str,
) -> Target:
    """The target of absolute XYXY ``boxes`` clipped to an image of ``size`` (height, width), less those left
    without area (as DETR drops them), which a warning names by their ``keys`` (``keys_are``: what they are)."""
    boxes = clip_boxes_to_image(boxes.reshape(-1, 4), size)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.all():
        dropped = [key for key, kept in zip(keys, keep.tolist()) if not kept]
        warnings.warn(
            f"{path}: dropped {len(dropped)} of {len(keep)} boxes with no area inside the "
            f"{size[1]}x{size[0]} image ({keys_are} {dropped})",
            DegenerateBoxWarning,
            stacklevel=3,
        )
    return detection_target(boxes[keep], labels[keep], image_id, *size)


class FolderDetection(Dataset):
    """A detection dataset of image files: subclasses give ``__len__``, ``image_path`` and ``load``.

    ``class_names`` are in label order; ``category_ids[label]`` is the class's id in COCO JSON written of it
    (1..K, COCO's numbering, unless the files have ids of their own). An image that cannot be read raises, or
    with ``bad_samples="skip"`` is replaced (``data/bad_samples.py``)."""

    def __init__(
        self, class_names: Sequence[str], transforms: SampleTransform | None = None, bad_samples: str = "error"
    ) -> None:
        check_bad_samples_action(bad_samples)
        self.bad_samples = bad_samples
        self.class_names: list[str] = list(class_names)
        self.category_ids: list[int] = list(range(1, len(self.class_names) + 1))
        self.transforms = transforms if transforms is not None else detr_base_transforms()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def image_path(self, index: int) -> Path:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Image.Image, Target]:
        """The untransformed sample: the RGB image and the absolute XYXY boxes of its objects."""
        raise NotImplementedError

    def file_name(self, image_id: int) -> str:
        """The name of the image with ``image_id`` (the id of the targets), as detection files give it."""
        return str(self.image_path(image_id))

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        sample, replaced = load_or_replace(self.load, index, len(self), self.bad_samples, self.image_path)
        image, target = self.transforms(*sample)
        if replaced is not None:
            target[REPLACES] = str(replaced)
        return image, target


class LabelledFolder(FolderDetection):
    """A folder of images whose objects were read beforehand (``LabelledImage``), one a sample, in order;
    the image id of a sample is its index."""

    def __init__(
        self,
        images: Sequence[LabelledImage],
        class_names: Sequence[str],
        transforms: SampleTransform | None = None,
        bad_samples: str = "error",
    ) -> None:
        super().__init__(class_names, transforms, bad_samples)
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.images[index].image

    def absolute_boxes(self, entry: LabelledImage, height: int, width: int) -> Tensor:
        """The entry's boxes as absolute XYXY pixels on a (height, width) image."""
        raise NotImplementedError

    def _target(self, index: int, size: tuple[int, int]) -> Target:
        entry = self.images[index]
        boxes = self.absolute_boxes(entry, *size)
        return boxes_with_area(boxes, entry.labels, size, index, entry.image, entry.lines, "label file lines")

    def load(self, index: int) -> tuple[Image.Image, Target]:
        image = load_rgb_image(self.images[index].image)
        return image, self._target(index, (image.height, image.width))

    def target(self, index: int) -> Target:
        """The untransformed target alone, the image's size read from its header (not decoded)."""
        with open_image(self.images[index].image) as image:
            size = image.height, image.width
        return self._target(index, size)
