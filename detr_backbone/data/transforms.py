"""DETR's image + box augmentation, built from torchvision.transforms.v2.

A sample enters as ``(image, target)``: a PIL image (or ``tv_tensors.Image``) and the raw target of
:func:`detection_target`, whose ``boxes`` are ``tv_tensors.BoundingBoxes`` in absolute XYXY pixels, so
every v2 geometric transform moves them with the image. It leaves in DETR's format (see
:class:`ToDetrFormat`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

Target = dict[str, Any]
SampleTransform = Callable[[Any, Target], tuple[Tensor, Target]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNNORMALIZED = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # pixels / 255 as they are (RT-DETR's input)
DETR_SCALES = tuple(range(480, 801, 32))  # 480, 512, ..., 800: DETR's multi-scale training sizes


def detection_target(boxes_xyxy: Tensor, labels: Tensor, image_id: int, height: int, width: int) -> Target:
    """The raw target a dataset hands to its transforms: absolute XYXY boxes on a (height, width) canvas."""
    return {
        "boxes": tv_tensors.BoundingBoxes(
            boxes_xyxy.to(torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
        ),
        "labels": labels.to(torch.int64).reshape(-1),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
    }


class ToDetrFormat:
    """Last step of every pipeline: plain float image, boxes as float32 cxcywh normalized by the final
    (unpadded) image size, and ``size`` = that size; the model never sees tv_tensors subclasses."""

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            **target,
            "boxes": boxes.as_subclass(Tensor).to(torch.float32) / scale,
            "size": torch.tensor([height, width], dtype=torch.int64),
        }
        return image.as_subclass(Tensor), target


class RandomSizeCrop(v2.Transform):
    """DETR's crop: a window whose height and width are drawn uniformly from [min_size, max_size], at a
    random position. Sides are capped at the image's own (DETR would raise on a smaller image)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size} and {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def _random_side(self, image_side: int) -> int:
        high = min(image_side, self.max_size)
        return int(torch.randint(min(self.min_size, high), high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image_height, image_width = v2.query_size(flat_inputs)
        height, width = self._random_side(image_height), self._random_side(image_width)
        top = int(torch.randint(0, image_height - height + 1, ()))
        left = int(torch.randint(0, image_width - width + 1, ()))
        return dict(top=top, left=left, height=height, width=width)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Boxes are clipped to the window by the crop kernel; SanitizeBoundingBoxes later drops empty ones.
        return self._call_kernel(F.crop, inpt, **params)


def pixel_statistics(normalize: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a model input is ``(pixels / 255 - mean) / std`` with: ImageNet's, or none (0 and 1)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if normalize else UNNORMALIZED


def model_input_transforms(normalize: bool = True) -> list[Callable]:
    """Tensor conversion, ImageNet normalization (``normalize``; else pixels / 255 only), box clean-up and DETR's
    target format."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        *([v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)] if normalize else []),
        v2.SanitizeBoundingBoxes(),  # drops degenerate boxes and the labels that go with them
        ToDetrFormat(),
    ]


def detr_base_transforms(normalize: bool = True) -> v2.Compose:
    """No augmentation, no resizing: the default of the datasets in this package."""
    return v2.Compose(model_input_transforms(normalize))


def detr_train_transforms(
    scales: Sequence[int] = DETR_SCALES,
    max_size: int = 1333,
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_min: int = 384,
    crop_max: int = 600,
    flip_prob: float = 0.5,
    normalize: bool = True,
) -> v2.Compose:
    """DETR's training augmentation (``make_coco_transforms("train")``)."""
    # DETR's RandomResize(sizes, max_size) resizes the shorter side to one of `sizes`: v2's RandomShortestSize.
    multi_scale = v2.RandomShortestSize(min_size=list(scales), max_size=max_size)
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=flip_prob),
            v2.RandomChoice(
                [
                    multi_scale,
                    v2.Compose(
                        [
                            v2.RandomShortestSize(min_size=list(crop_scales)),
                            RandomSizeCrop(crop_min, crop_max),
                            multi_scale,
                        ]
                    ),
                ]
            ),
            *model_input_transforms(normalize),
        ]
    )


def detr_val_transforms(size: int = 800, max_size: int = 1333, normalize: bool = True) -> v2.Compose:
    """DETR's evaluation transform: shorter side to ``size``, longer side at most ``max_size``."""
    return v2.Compose([v2.Resize(size, max_size=max_size), *model_input_transforms(normalize)])
