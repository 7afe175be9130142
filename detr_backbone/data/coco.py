"""Any COCO-format detection folder: an image directory and an instances JSON file."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import box_convert, clip_boxes_to_image

from .transforms import SampleTransform, Target, detection_target, detr_base_transforms


def load_coco(annotation_file: Path) -> COCO:
    """pycocotools' index of ``annotation_file``, with errors that name the file."""
    try:
        with annotation_file.open(encoding="utf-8") as stream:
            dataset = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{annotation_file} is not valid JSON: {error}") from error
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise ValueError(f"{annotation_file} is not a COCO instances file: expected an object with an 'images' list")
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise ValueError(f"{annotation_file} has a malformed COCO entry: {error!r}") from error
    unknown = {ann["category_id"] for ann in coco.anns.values()} - set(coco.cats)
    if unknown:
        raise ValueError(f"{annotation_file} has annotations with undeclared category ids {sorted(unknown)}")
    return coco


def load_rgb_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except OSError as error:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"cannot read image {path}: {error}") from error


class DegenerateBoxWarning(UserWarning):
    """Boxes without area (zero width or height, or wholly outside the image) were dropped."""


class CocoDetection(Dataset):
    """COCO instances as DETR reads them: crowd regions dropped, boxes clipped to the image, and
    category ids mapped to contiguous labels 0..K-1 in sorted id order (``category_ids[label]`` = id)."""

    def __init__(
        self, image_dir: str | Path, annotation_file: str | Path, transforms: SampleTransform | None = None
    ) -> None:
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
        return self.transforms(*self.load(index))

    def load(self, index: int) -> tuple[Image.Image, Target]:
        """The untransformed sample: the RGB image and absolute XYXY boxes of its non-crowd objects."""
        image_id = self.image_ids[index]
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
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
