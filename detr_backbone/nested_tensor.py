"""A batch of differently sized images, padded to one size, with the mask of where the padding is.

``NestedTensor`` compiles as a TorchScript class, and the modules that read one annotate their input
with ``MaskedImages``, the interface of anything with DETR's ``decompose()``: a scripted DETR passes
its own ``util.misc.NestedTensor`` to our Joiner as it does to its own. The eager-only checks and
conveniences are left out of TorchScript (``torch.jit.unused``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor


class MaskedImages:
    """What the backbone and the encodings read from their input: ``(tensors, mask)``, DETR's signature."""

    def decompose(self) -> tuple[Tensor, Optional[Tensor]]:
        pass


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, given at declaration
    MaskedImages = torch.jit.interface(MaskedImages)


@torch.jit.unused
def check_mask(tensors: Tensor, mask: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"NestedTensor mask must be a bool tensor (True = padding), got dtype {mask.dtype}")
    if tensors.dim() < 3 or mask.shape != (tensors.shape[0], *tensors.shape[-2:]):
        raise ValueError(
            f"NestedTensor mask of shape {tuple(mask.shape)} does not match tensors of shape "
            f"{tuple(tensors.shape)}: the mask must be (batch, height, width) of the tensors"
        )


def padding_mask(masked: MaskedImages) -> tuple[Tensor, Tensor]:
    """``(tensors, mask)`` of a NestedTensor, ours or DETR's; a missing mask means no padding."""
    tensors, mask = masked.decompose()
    if mask is None:
        mask = torch.zeros(
            (tensors.shape[0], tensors.shape[-2], tensors.shape[-1]), dtype=torch.bool, device=tensors.device
        )
    return tensors, mask


class NestedTensor:
    """Images ``tensors`` (B, C, H, W) with a bool ``mask`` (B, H, W) that is True on padding."""

    def __init__(self, tensors: Tensor, mask: Tensor):
        if not torch.jit.is_scripting():
            check_mask(tensors, mask)
        self.tensors = tensors
        self.mask = mask

    @torch.jit.unused
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
    @torch.jit.unused
    def device(self) -> torch.device:
        return self.tensors.device

    @torch.jit.unused
    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)} {self.tensors.dtype}, padded={self.mask.float().mean():.3f})"


def nested_tensor_from_tensor_list(images: list[Tensor], size_divisibility: int = 0) -> NestedTensor:
    """Pad (C, H, W) images at the bottom and right to the batch's largest size.

    With ``size_divisibility`` > 0 the padded size is rounded up to a multiple of it, so that the
    feature maps of every stride line up with the image and a compiled model sees fewer shapes.
    """
    if not torch.jit.is_scripting():
        check_image_list(images, size_divisibility)
    height = max([image.shape[1] for image in images])
    width = max([image.shape[2] for image in images])
    if size_divisibility > 0:
        height = (height + size_divisibility - 1) // size_divisibility * size_divisibility
        width = (width + size_divisibility - 1) // size_divisibility * size_divisibility
    first = images[0]
    tensors = first.new_zeros((len(images), first.shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for index, image in enumerate(images):
        tensors[index, :, : image.shape[1], : image.shape[2]].copy_(image)
        mask[index, : image.shape[1], : image.shape[2]] = False
    return NestedTensor(tensors, mask)


@torch.jit.unused
def check_image_list(images: Sequence[Tensor], size_divisibility: int) -> None:
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
