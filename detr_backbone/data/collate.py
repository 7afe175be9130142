"""Batching detection samples: images padded into a NestedTensor, targets kept as a list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from .transforms import Target

BatchResize = Callable[[Sequence[Tensor], Sequence[Target]], tuple[list[Tensor], list[Target]]]


def collate_detection(
    batch: Sequence[tuple[Tensor, Target]], size_divisibility: int = 0, resize: BatchResize | None = None
) -> tuple[NestedTensor, list[Target]]:
    """Pad a list of ``(image, target)`` samples; targets differ in length, so they stay a list.

    ``resize`` (multi-scale batches, data/augment.py) rescales the images first; boxes are normalised, so only
    the targets' ``size`` follows."""
    if len(batch) == 0:
        raise ValueError("collate_detection got an empty batch")
    images, targets = zip(*batch)
    if resize is not None:
        images, targets = resize(images, targets)
    return nested_tensor_from_tensor_list(images, size_divisibility), list(targets)


@dataclass(frozen=True)
class DetectionCollate:
    """``collate_detection`` with a fixed ``size_divisibility`` and batch resize, picklable for DataLoader workers."""

    size_divisibility: int = 0
    resize: BatchResize | None = None

    def __call__(self, batch: Sequence[tuple[Tensor, Target]]) -> tuple[NestedTensor, list[Target]]:
        return collate_detection(batch, self.size_divisibility, self.resize)
