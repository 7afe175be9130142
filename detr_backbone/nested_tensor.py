"""A batch of differently sized images, padded to one size, with the mask of where the padding is."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class NestedTensor:
    """Images ``tensors`` (B, C, H, W) with a bool ``mask`` (B, H, W) that is True on padding."""

    def __init__(self, tensors: Tensor, mask: Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"NestedTensor mask must be a bool tensor (True = padding), got dtype {mask.dtype}")
        if tensors.dim() < 3 or mask.shape != (tensors.shape[0], *tensors.shape[-2:]):
            raise ValueError(
                f"NestedTensor mask of shape {tuple(mask.shape)} does not match tensors of shape "
                f"{tuple(tensors.shape)}: the mask must be (batch, height, width) of the tensors"
            )
        self.tensors = tensors
        self.mask = mask

    def to(self, *args, **kwargs) -> NestedTensor:
        """Move and cast the tensors like ``Tensor.to``; the mask follows by device only and stays bool."""
        tensors = self.tensors.to(*args, **kwargs)
        non_blocking = kwargs.get("non_blocking", False)
        return NestedTensor(tensors, self.mask.to(tensors.device, non_blocking=non_blocking))

    def pin_memory(self) -> NestedTensor:
        return NestedTensor(self.tensors.pin_memory(), self.mask.pin_memory())

    def decompose(self) -> tuple[Tensor, Tensor]:
        return self.tensors, self.mask

    @property
    def device(self) -> torch.device:
        return self.tensors.device

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)} {self.tensors.dtype}, padded={self.mask.float().mean():.3f})"


def nested_tensor_from_tensor_list(images: Sequence[Tensor], size_divisibility: int = 0) -> NestedTensor:
    """Pad (C, H, W) images at the bottom and right to the batch's largest size.

    With ``size_divisibility`` > 0 the padded size is rounded up to a multiple of it, so that the
    feature maps of every stride line up with the image and a compiled model sees fewer shapes.
    """
    if len(images) == 0:
        raise ValueError("nested_tensor_from_tensor_list needs at least one image, got an empty list")
    if size_divisibility < 0:
        raise ValueError(f"size_divisibility must be >= 0, got {size_divisibility}")
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != images[0].shape[0]:
            raise ValueError(
                f"image {index} has shape {tuple(image.shape)}: every image must be (C, H, W) with the same "
                f"number of channels as image 0 ({tuple(images[0].shape)})"
            )
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    if size_divisibility > 0:
        height = math.ceil(height / size_divisibility) * size_divisibility
        width = math.ceil(width / size_divisibility) * size_divisibility
    first = images[0]
    tensors = first.new_zeros((len(images), channels, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for image, padded, padding in zip(images, tensors, mask):
        padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        padding[: image.shape[1], : image.shape[2]] = False
    return NestedTensor(tensors, mask)
