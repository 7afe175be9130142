"""Images as the detector takes them: read from any accepted form, resized and normalised as in evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from ..data.augment import square_transforms
from ..data.images import load_rgb_image, upright
from ..data.transforms import detection_target, detr_base_transforms, detr_val_transforms
from ..image_input import InputConfig

ImageInput = Union[str, os.PathLike, Image.Image, Tensor]  # a file, a PIL image, or a (3, H, W) tensor


def read_image(image: ImageInput) -> Image.Image | tv_tensors.Image:
    """An RGB image from a path, a PIL image, or a (3, H, W) tensor: uint8 in 0..255 or floating in 0..1.
    Files and PIL images are turned upright by their EXIF orientation, so boxes are in the pixels viewers show."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb_image(Path(image), as_viewed=True)
    if isinstance(image, Image.Image):
        image = upright(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise ValueError(
                f"an image tensor must be (3, H, W), uint8 (0..255) or floating (0..1); got {tuple(image.shape)} {image.dtype}"
            )
        return tv_tensors.Image(image)
    raise TypeError(f"an image must be a path, a PIL image or a (3, H, W) tensor, got {type(image).__name__}")


def image_size(image: Image.Image | Tensor) -> tuple[int, int]:
    """(height, width)."""
    return (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])


class EvalTransform:
    """The data pipeline's evaluation transform for one image, as the detector's ``input`` record says: when
    ``size`` is set, DETR's resize (shorter side ``size``, longer side at most ``max_size``) or a ``size`` x
    ``size`` square; else none; then ImageNet normalisation, or pixels / 255 only.

    Returns the (3, h, w) float32 model input and the original (height, width), for boxes in its pixels.
    """

    def __init__(self, size: int | None = None, max_size: int = 1333, input: InputConfig | None = None):
        self.input = input or InputConfig()
        square = self.input.resize == "square"
        if size is not None and (size <= 0 or (not square and size > max_size)):
            bound = "0 < size (a square's side)" if square else "0 < size <= max_size"
            raise ValueError(f"resize needs {bound}, got size={size} and max_size={max_size}")
        self.size, self.max_size = size, max_size
        normalize = self.input.normalize
        if not size:
            self.pipeline = detr_base_transforms(normalize)
        elif square:
            self.pipeline = square_transforms(size, 0.0, normalize=normalize)
        else:
            self.pipeline = detr_val_transforms(size, max_size, normalize)

    def __call__(self, image: Image.Image | Tensor) -> tuple[Tensor, tuple[int, int]]:
        height, width = image_size(image)
        no_boxes = detection_target(torch.zeros(0, 4), torch.zeros(0), 0, height, width)
        return self.pipeline(image, no_boxes)[0], (height, width)
