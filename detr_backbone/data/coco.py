"""Any COCO-format detection folder: an image directory and an instances JSON file."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_convert, clip_boxes_to_image

from .bad_samples import REPLACES, check_bad_samples_action, load_or_replace
from .images import MissingImageError, UnreadableImageError, as_rgb, upright
from .transforms import SampleTransform, Target, detection_target, detr_base_transforms


def read_instances(annotation_file: Path) -> dict:
    """The parsed JSON of a COCO instances file, with errors that name the file."""
    try:
        with annotation_file.open(encoding="utf-8") as stream:
            dataset = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{annotation_file} is not valid JSON: {error}") from error
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise ValueError(f"{annotation_file} is not a COCO instances file: expected an object with an 'images' list")
    return dataset


def load_coco(annotation_file: Path, index: type = COCO) -> COCO:
    """pycocotools' index of ``annotation_file`` (or ``index``'s, a class with its API), with errors that name the file."""
    coco = index()
    coco.dataset = read_instances(annotation_file)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise ValueError(f"{annotation_file} has a malformed COCO entry: {error!r}") from error
    unknown = {ann["category_id"] for ann in coco.anns.values()} - set(coco.cats)
    if unknown:
        raise ValueError(f"{annotation_file} has annotations with undeclared category ids {sorted(unknown)}")
    return coco


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """PIL's lazily decoded image at ``path``; errors while opening or decoding it name the file."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise MissingImageError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as error:  # not an OSError: PIL refuses to decode the file at all
        raise UnreadableImageError(
            f"cannot read image {path}: {error} (PIL's decompression-bomb limit is twice "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; raise it only for files you trust)"
        ) from None
    except OSError as error:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise UnreadableImageError(f"cannot read image {path}: {error}") from error


def load_rgb_image(path: Path, as_viewed: bool = False) -> Image.Image:
    """The image at ``path``, decoded whole (a truncated file fails here), as 8-bit RGB: its stored pixels,
    or with ``as_viewed`` turned by its EXIF orientation as viewers show it."""
    with open_image(path) as image:
        return as_rgb(upright(image) if as_viewed else image)


class DegenerateBoxWarning(UserWarning):
    """Boxes without area (zero width or height, or wholly outside the image) were dropped."""


class CocoDetection(Dataset):
    """COCO instances as DETR reads them: crowd regions dropped, boxes clipped to the image, and
    category ids mapped to contiguous labels 0..K-1 in sorted id order (``category_ids[label]`` = id).
    An image that cannot be read raises, or with ``bad_samples="skip"`` is replaced (``data/bad_samples.py``)."""

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: SampleTransform | None = None,
        bad_samples: str = "error",
    ) -> None:
        check_bad_samples_action(bad_samples)
        self.bad_samples = bad_samples
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco(self.annotation_file)
        self.image_ids: list[int] = sorted(self.coco.imgs)
        self.category_ids: list[int] = sorted(self.coco.cats)
        self.class_names: list[str] = [self.coco.cats[cat_id]["name"] for cat_id in self.category_ids]
        self._label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}
        self.transforms = transforms if transforms is not None else detr_base_transforms()

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        sample, replaced = load_or_replace(self.load, index, len(self), self.bad_samples, self.image_path)
        image, target = self.transforms(*sample)
        if replaced is not None:
            target[REPLACES] = str(replaced)
        return image, target

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def load(self, index: int) -> tuple[Image.Image, Target]:
        """The untransformed sample: the RGB image and absolute XYXY boxes of its non-crowd objects."""
        image_id = self.image_ids[index]
        path = self.image_path(index)
        image = load_rgb_image(path)
        annotations = [ann for ann in self.coco.imgToAnns[image_id] if not ann.get("iscrowd", 0)]
        xywh = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes = clip_boxes_to_image(box_convert(xywh, "xywh", "xyxy"), (image.height, image.width))
        labels = torch.tensor([self._label_of[ann["category_id"]] for ann in annotations], dtype=torch.int64)
        # Like DETR, drop boxes with no area (zero-size or wholly outside the image once clipped).
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not keep.all():
            dropped = [ann["id"] for ann, kept in zip(annotations, keep.tolist()) if not kept]
            warnings.warn(
                f"{path}: dropped {len(dropped)} of {len(annotations)} boxes with no area inside the "
                f"{image.width}x{image.height} image (annotation ids {dropped})",
                DegenerateBoxWarning,
                stacklevel=2,
            )
        return image, detection_target(boxes[keep], labels[keep], image_id, image.height, image.width)
