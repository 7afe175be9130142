"""Training augmentation policies (``data.augment``): DETR's, RT-DETR's, DEIM's, or none, switched by run progress.

A policy is a list of phases, each starting at a fraction of the run. The phase in force is read from
an :class:`AugmentState`, a pair (epoch, progress) in shared memory that a callback writes at each
epoch start, so DataLoader workers (persistent ones too) see the switch without being rebuilt. Every
training sample is a pure function of (seed, epoch, image id): its random draws, Mosaic's and MixUp's
partners included, come from a stream seeded by that key, so reruns and resumed runs see the same data.

Switch points, as fractions (the references' epochs over their schedules):

- rtdetr: photometric distortion, zoom-out and IoU crop stop at 71/72 (RT-DETRv2's stop_epoch), and
  so do the multi-scale batches;
- deim: flip and resize only until 4/58, Mosaic (p 0.5, replacing zoom-out and IoU crop) and MixUp
  (p 0.5) until 29/58, RT-DETR's pieces until 50/58, flip and resize only after (DEIM's D-FINE-L/X
  schedule: policy epochs [4, 29, 50], mixup epochs [4, 29], stop epoch 50 of 58).

``data.augment_stop`` moves the last switch of either policy, ``data.mosaic_phase`` deim's Mosaic and MixUp
(DEIM-S, 132 epochs: [4/132, 64/132] and stop 120/132).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..image_input import InputConfig
from ..validation import require
from .shapes import MAX_SIDE
from .transforms import (
    DETR_SCALES,
    SampleTransform,
    Target,
    detr_base_transforms,
    detr_train_transforms,
    model_input_transforms,
)

POLICIES = ("detr", "rtdetr", "deim", "none")
FILES_SIZE = 640  # RT-DETR's and DEIM's square input side
DETR_VAL_SIDE = 800  # DETR's evaluation side, the reference its training sizes are scaled from

# the references' probabilities, each overridable by the data key of the same name
PROBABILITIES = {
    "flip_prob": 0.5,
    "photometric_prob": 0.5,  # RandomPhotometricDistort
    "zoom_out_prob": 0.5,  # RandomZoomOut (canvas up to 4x the image side, filled with 0)
    "iou_crop_prob": 0.8,  # RandomIoUCrop
    "mosaic_prob": 0.5,  # deim
    "mixup_prob": 0.5,  # deim
}
RTDETR_STOP = 71 / 72
DEIM_POINTS = (4 / 58, 29 / 58, 50 / 58)  # Mosaic + MixUp on, off, then no augmentation
MOSAIC_AFFINE = {"degrees": 10.0, "translate": (0.1, 0.1), "scale": (0.5, 1.5)}  # DEIM's Mosaic
MIXUP_WEIGHTS = (0.45, 0.55)  # the range of the first image's weight


def check_augment(values: Mapping[str, Any], prefix: str = "data.") -> None:
    """One-line errors naming the key: an unknown policy, a probability outside [0, 1], a bad side."""
    policy = values.get("augment")
    require(
        policy is None or policy in POLICIES,
        f"{prefix}augment={policy!r} is not one of {', '.join(POLICIES)} (or null: the data's default)",
    )
    for key in PROBABILITIES:
        probability = values.get(key)
        require(
            probability is None or 0 <= probability <= 1,
            f"{prefix}{key}={probability} must be a probability in [0, 1] (or null: the policy's)",
        )
    sizes = list(values.get("multi_scale") or [])
    require(all(size >= 1 for size in sizes), f"{prefix}multi_scale={sizes} must list sides >= 1 (or []: off)")
    size = values.get("size")
    require(size is None or size >= 1, f"{prefix}size={size} must be >= 1 pixel")
    stop = values.get("augment_stop")
    require(
        stop is None or 0 < stop <= 1,
        f"{prefix}augment_stop={stop} must be a fraction of the run in (0, 1] "
        "(or null: the policy's, rtdetr 71/72, deim 50/58)",
    )
    phase = values.get("mosaic_phase")
    if phase is not None:
        start, end = tuple(phase) if len(phase) == 2 else (None, None)
        last = DEIM_POINTS[2] if stop is None else stop
        require(
            start is not None and 0 <= start < end <= last,
            f"{prefix}mosaic_phase={list(phase)} must be [start, end] fractions of the run with "
            f"0 <= start < end <= the augmentation's stop ({last:.3f}) (or null: deim's 4/58, 29/58)",
        )


class IoUCrop(v2.RandomIoUCrop):
    """RT-DETR's RandomIoUCrop with a probability; an image without boxes passes untouched (torchvision's needs one)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        boxes = sample[1]["boxes"]
        if torch.rand(()) >= self.p or len(boxes) == 0:
            return sample
        return super().forward(*inputs)


def rtdetr_pieces(probabilities: Mapping[str, float], mosaic: bool = False) -> list[Callable]:
    """RT-DETR's augmentation before the flip; a Mosaic sample skips zoom-out and IoU crop (DEIM)."""
    pieces: list[Callable] = [v2.RandomPhotometricDistort(p=probabilities["photometric_prob"])]
    if not mosaic:
        pieces += [
            v2.RandomApply([v2.RandomZoomOut(fill=0)], p=probabilities["zoom_out_prob"]),
            IoUCrop(p=probabilities["iou_crop_prob"]),
        ]
    return [*pieces, v2.SanitizeBoundingBoxes(min_size=1)]


def square_transforms(
    size: int, flip_prob: float, pieces: Sequence[Callable] = (), normalize: bool = True
) -> v2.Compose:
    """``pieces``, the flip, a resize to ``size`` x ``size`` (no aspect ratio kept, as RT-DETR), then the model's
    format (ImageNet-normalised with ``normalize``)."""
    return v2.Compose(
        [
            *pieces,
            v2.RandomHorizontalFlip(p=flip_prob),
            v2.Resize([size, size]),
            v2.SanitizeBoundingBoxes(min_size=1),
            *model_input_transforms(normalize),
        ]
    )


class Mosaic:
    """Four samples on one canvas (DEIM's Mosaic without its cache): each resized so its shorter side is
    ``cell``, pasted at the top-left of its quarter of a 2 x 2 grid of the largest resized size, boxes
    moved with it; then one random affine (rotation, translation, scale, filled with 0) of the whole."""

    def __init__(self, cell: int, affine: Mapping[str, Any] = MOSAIC_AFFINE) -> None:
        self.resize = v2.Resize(cell)
        self.affine = v2.RandomAffine(**affine, fill=0)

    def place(self, samples: Sequence[tuple[Any, Target]]) -> tuple[tv_tensors.Image, Target]:
        """The 2 x 2 canvas before the affine."""
        resized = [self.resize(F.to_image(image), target) for image, target in samples]
        cell_height = max(image.shape[-2] for image, _ in resized)
        cell_width = max(image.shape[-1] for image, _ in resized)
        first_image, first_target = resized[0]
        canvas = torch.zeros((first_image.shape[0], 2 * cell_height, 2 * cell_width), dtype=first_image.dtype)
        boxes, labels = [], []
        for quarter, (image, target) in enumerate(resized):
            top, left = (quarter // 2) * cell_height, (quarter % 2) * cell_width
            canvas[:, top : top + image.shape[-2], left : left + image.shape[-1]] = image
            boxes.append(target["boxes"].as_subclass(Tensor) + torch.tensor([left, top, left, top]))
            labels.append(target["labels"])
        target = {
            **first_target,
            "boxes": tv_tensors.BoundingBoxes(
                torch.cat(boxes), format="XYXY", canvas_size=(2 * cell_height, 2 * cell_width)
            ),
            "labels": torch.cat(labels),
        }
        return tv_tensors.Image(canvas), target

    def __call__(self, samples: Sequence[tuple[Any, Target]]) -> tuple[tv_tensors.Image, Target]:
        return self.affine(*self.place(samples))


def mixup(first: tuple[Tensor, Target], second: tuple[Tensor, Target], weight: float) -> tuple[Tensor, Target]:
    """Two finished samples blended, ``weight`` on the first; the boxes of both kept (they are normalised, so
    the second image is resized to the first's size without touching its boxes)."""
    (image, target), (other, other_target) = first, second
    if other.shape[-2:] != image.shape[-2:]:
        other = F.resize(other, list(image.shape[-2:]))
    return weight * image + (1 - weight) * other, {
        **target,
        "boxes": torch.cat([target["boxes"], other_target["boxes"]]),
        "labels": torch.cat([target["labels"], other_target["labels"]]),
    }


@dataclass(frozen=True)
class Phase:
    """What a policy does from ``start`` (a fraction of the run) until the next phase."""

    start: float
    transforms: SampleTransform
    mosaic_prob: float = 0.0
    mosaic_transforms: SampleTransform | None = None  # applied after the Mosaic
    mixup_prob: float = 0.0
    multi_scale: bool = True  # whether multi-scale batches (data.multi_scale) are drawn


@dataclass(frozen=True)
class Policy:
    name: str
    square_size: int  # the side of rtdetr's and deim's inputs, and the one data.multi_scale's sizes replace
    phases: tuple[Phase, ...]
    mosaic: Mosaic | None = None

    def phase_at(self, progress: float) -> Phase:
        return [phase for phase in self.phases if phase.start <= progress][-1]


class AugmentState:
    """(epoch, progress) of the run in shared memory: written by the training process, read by every worker."""

    def __init__(self) -> None:
        self._values = torch.zeros(2, dtype=torch.float64).share_memory_()

    def set(self, epoch: int, progress: float) -> None:
        self._values.copy_(torch.tensor([epoch, progress], dtype=torch.float64))

    @property
    def epoch(self) -> int:
        return int(self._values[0])

    @property
    def progress(self) -> float:
        return float(self._values[1])


def sample_seed(seed: int, epoch: int, key: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, key]).generate_state(1, np.uint64)[0])


@dataclass
class PolicyTransforms:
    """The train transform of a dataset: the policy's phase in force, with random draws seeded per sample.

    Mosaic and MixUp need other samples: :meth:`bind` gives it the dataset, whose ``__getitem__`` it calls
    for the partners' untransformed samples.
    """

    policy: Policy
    seed: int = 0
    state: AugmentState = field(default_factory=AugmentState)
    source: Dataset | None = field(default=None, repr=False)
    _untransformed: bool = field(default=False, repr=False)

    def bind(self, dataset: Dataset) -> None:
        self.source = dataset

    @property
    def phase(self) -> Phase:
        return self.policy.phase_at(self.state.progress)

    def __call__(self, image: Any, target: Target) -> tuple[Tensor, Target]:
        if self._untransformed:
            return image, target
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(
                sample_seed(self.seed, self.state.epoch, int(target["image_id"]))
            )
            return self._augment(image, target, self.phase, mix=True)

    def _raw(self, index: int) -> tuple[Any, Target]:
        self._untransformed = True
        try:
            return self.source[index]
        finally:
            self._untransformed = False

    def _partners(self, count: int) -> list[int]:
        return torch.randint(len(self.source), (count,)).tolist()

    def _augment(self, image: Any, target: Target, phase: Phase, mix: bool) -> tuple[Tensor, Target]:
        mixing = self.source is not None
        if mixing and torch.rand(()) < phase.mosaic_prob:
            mosaic = self.policy.mosaic([(image, target), *map(self._raw, self._partners(3))])
            sample = phase.mosaic_transforms(*mosaic)
        else:
            sample = phase.transforms(image, target)
        if mix and mixing and torch.rand(()) < phase.mixup_prob:
            weight = float(torch.empty(()).uniform_(*MIXUP_WEIGHTS))
            partner = self._augment(*self._raw(self._partners(1)[0]), phase, mix=False)
            sample = mixup(sample, partner, weight)
        return sample


@dataclass(frozen=True)
class MultiScale:
    """RT-DETR's multi-scale batches: one side per batch drawn from ``sizes``; every image is scaled by
    ``side / square_size`` (a square input becomes side x side), while the policy's phase allows it."""

    sizes: tuple[int, ...]
    policy: Policy
    state: AugmentState
    seed: int = 0

    def __call__(self, images: Sequence[Tensor], targets: Sequence[Target]) -> tuple[list[Tensor], list[Target]]:
        if not self.policy.phase_at(self.state.progress).multi_scale:
            return list(images), list(targets)
        # the batch's size is a function of (seed, epoch, its first image), like its samples
        key = sample_seed(self.seed, self.state.epoch, int(targets[0]["image_id"]))
        side = self.sizes[int(np.random.default_rng(key).integers(len(self.sizes)))]
        resized = [
            F.resize(
                image,
                [
                    round(image.shape[-2] * side / self.policy.square_size),
                    round(image.shape[-1] * side / self.policy.square_size),
                ],
            )
            for image in images
        ]
        targets = [{**target, "size": torch.tensor(image.shape[-2:])} for image, target in zip(resized, targets)]
        return resized, targets


def build_policy(
    name: str,
    square_size: int,
    detr_train: Callable[[], SampleTransform],
    plain: SampleTransform,
    probabilities: Mapping[str, float | None] | None = None,
    normalize: bool = True,
    stop: float | None = None,
    mosaic_phase: Sequence[float] | None = None,
) -> Policy:
    """The phases of ``name``: ``detr_train`` builds DETR's augmentation, ``plain`` is the no-augmentation
    transform of ``none`` (resize and normalise only), ``square_size`` the side of rtdetr and deim, whose
    inputs are ImageNet-normalised with ``normalize``; ``stop`` (rtdetr, deim) and ``mosaic_phase`` (deim) move
    the policy's switches (None: the reference's)."""
    probabilities = probabilities or {}
    p = {
        key: default if probabilities.get(key) is None else probabilities[key] for key, default in PROBABILITIES.items()
    }
    if name == "detr":
        return Policy(name, square_size, (Phase(0.0, detr_train()),))
    if name == "none":
        return Policy(name, square_size, (Phase(0.0, plain),))
    rtdetr = square_transforms(square_size, p["flip_prob"], rtdetr_pieces(p), normalize)
    flip_only = square_transforms(square_size, p["flip_prob"], normalize=normalize)
    if name == "rtdetr":
        stop = RTDETR_STOP if stop is None else stop
        return Policy(name, square_size, (Phase(0.0, rtdetr), Phase(stop, flip_only, multi_scale=False)))
    mosaic_on, mosaic_off = DEIM_POINTS[:2] if mosaic_phase is None else mosaic_phase
    stop = DEIM_POINTS[2] if stop is None else stop
    mosaic_phase = Phase(
        mosaic_on,
        rtdetr,
        mosaic_prob=p["mosaic_prob"],
        mosaic_transforms=square_transforms(square_size, p["flip_prob"], rtdetr_pieces(p, mosaic=True), normalize),
        mixup_prob=p["mixup_prob"],
    )
    phases = (Phase(0.0, flip_only), mosaic_phase, Phase(mosaic_off, rtdetr), Phase(stop, flip_only, multi_scale=False))
    return Policy(name, square_size, phases, Mosaic(square_size // 2))  # DEIM: 320-pixel cells for a 640 input


def scaled_detr_train(side: int, normalize: bool = True) -> Callable[[], v2.Compose]:
    """DETR's training augmentation with every size scaled by ``side / 800`` (DETR's evaluation side)."""
    factor = side / DETR_VAL_SIDE

    def scaled(sizes: Sequence[int]) -> list[int]:
        return [max(1, round(size * factor)) for size in sizes]

    crop_min, crop_max = scaled((384, 600))
    return lambda: detr_train_transforms(
        scaled(DETR_SCALES), round(1333 * factor), scaled((400, 500, 600)), crop_min, crop_max, normalize=normalize
    )


def _probabilities(values: Mapping[str, Any]) -> dict[str, float | None]:
    return {key: values.get(key) for key in PROBABILITIES}


def policy_transforms(
    values: Mapping[str, Any],
    default: str,
    detr_train: Callable[[], SampleTransform],
    plain: SampleTransform,
    input: InputConfig,
) -> tuple[PolicyTransforms, SampleTransform]:
    """Train and val transforms of ``values["augment"]`` (``default`` when unset), normalised as ``input`` says;
    rtdetr and deim, and a detector taking squares (``input.resize``), validate on the square side, detr and
    none otherwise on ``plain``; for a detector taking squares, ``none`` trains on them."""
    check_augment(values)
    name, side = values.get("augment") or default, square_side(values)
    square = square_transforms(side, 0.0, normalize=input.normalize)
    if input.resize == "square":  # a detector taking squares trains on them too, as RT-DETR's "none" does
        plain = square
    policy = build_policy(
        name,
        side,
        detr_train,
        plain,
        _probabilities(values),
        input.normalize,
        values.get("augment_stop"),
        values.get("mosaic_phase"),
    )
    val = square if name in ("rtdetr", "deim") or input.resize == "square" else plain
    return PolicyTransforms(policy, values.get("seed") or 0), val


def square_side(values: Mapping[str, Any]) -> int:
    """The side of a data config's square inputs (rtdetr's and deim's, and a square evaluation): the shapes data's
    ``max_size``, an image folder's ``size`` (640)."""
    if values.get("kind", "shapes") == "shapes":
        return values.get("max_size") or MAX_SIDE
    return values.get("size") or FILES_SIZE


def shapes_policy_transforms(
    values: Mapping[str, Any], input: InputConfig | None = None
) -> tuple[PolicyTransforms, SampleTransform]:
    """The shapes data's: no augmentation by default."""
    input = input or InputConfig()
    detr_train = scaled_detr_train(square_side(values), input.normalize)
    return policy_transforms(values, "none", detr_train, detr_base_transforms(input.normalize), input)


def files_policy_transforms(
    values: Mapping[str, Any],
    detr_train: Callable[[], SampleTransform],
    detr_val: SampleTransform,
    input: InputConfig | None = None,
) -> tuple[PolicyTransforms, SampleTransform]:
    """An image folder's: DETR's by default."""
    return policy_transforms(values, "detr", detr_train, detr_val, input or InputConfig())
