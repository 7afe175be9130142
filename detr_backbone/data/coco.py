"""Any COCO-format detection folder: an image directory and an instances JSON file."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torchvision.ops import box_convert

from .folder import DegenerateBoxWarning, FolderDetection, boxes_with_area
from .images import load_rgb_image
from .transforms import SampleTransform, Target

__all__ = ["CocoDetection", "DegenerateBoxWarning", "instances", "load_coco", "read_instances"]


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


def instances(
    targets: Iterable[Mapping[str, Tensor]],
    class_names: Sequence[str],
    category_ids: Sequence[int],
    file_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A COCO instances dict of raw targets (absolute XYXY ``boxes``, ``labels``, ``image_id``, ``orig_size``),
    the images named by ``file_names`` where given."""
    images, annotations = [], []
    for index, target in enumerate(targets):
        image_id = int(target["image_id"])
        height, width = target["orig_size"].tolist()
        named = {"file_name": file_names[index]} if file_names is not None else {}
        images.append({"id": image_id, **named, "height": height, "width": width})
        boxes = box_convert(target["boxes"].as_subclass(Tensor).float(), "xyxy", "xywh")
        for box, label in zip(boxes.tolist(), target["labels"].tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category_ids[label]),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": int(cat_id), "name": str(name)} for cat_id, name in zip(category_ids, class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


class CocoDetection(FolderDetection):
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
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco(self.annotation_file)
        category_ids = sorted(self.coco.cats)
        super().__init__([self.coco.cats[cat_id]["name"] for cat_id in category_ids], transforms, bad_samples)
        self.image_ids: list[int] = sorted(self.coco.imgs)
        self.category_ids: list[int] = category_ids
        self._label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def file_name(self, image_id: int) -> str:
        return self.coco.imgs[image_id]["file_name"]

    def load(self, index: int) -> tuple[Image.Image, Target]:
        """The untransformed sample: the RGB image and absolute XYXY boxes of its non-crowd objects."""
        image_id = self.image_ids[index]
        path = self.image_path(index)
        image = load_rgb_image(path)
        annotations = [ann for ann in self.coco.imgToAnns[image_id] if not ann.get("iscrowd", 0)]
        xywh = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self._label_of[ann["category_id"]] for ann in annotations], dtype=torch.int64)
        # Like DETR, drop boxes with no area (zero-size or wholly outside the image once clipped).
        ids = [ann["id"] for ann in annotations]
        boxes = box_convert(xywh, "xywh", "xyxy")
        return image, boxes_with_area(boxes, labels, (image.height, image.width), image_id, path, ids, "annotation ids")


def write_coco(folder: Path, splits: Mapping[str, Iterable[tuple[Any, Target]]], class_names: Sequence[str]) -> None:
    """Samples (a PIL image and its raw target) as a COCO folder: ``<split>/<n>.png`` and
    ``annotations/instances_<split>.json``, category ids 1..K."""
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    for split, samples in splits.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        targets, names = [], []
        for index, (image, target) in enumerate(samples):
            names.append(f"{index:06d}.png")
            image.save(folder / split / names[-1])
            targets.append(target)
        content = instances(targets, class_names, range(1, len(class_names) + 1), names)
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
