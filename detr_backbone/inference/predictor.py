"""The inference API: a detector from a checkpoint, called on images, returning boxes in their pixels.

predictor = Predictor.from_checkpoint("outputs/run/checkpoints/last.ckpt", threshold=0.5)
detections = predictor(["a.jpg", "b.png"])          # one Detections per image
detections[0].boxes, detections[0].scores, detections[0].names
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..compilation import COMPILE_SIZE_DIVISIBILITY, compile_in_place
from ..detection import Detector
from ..image_input import InputConfig
from ..nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from .checkpoint import LoadedDetector, load_detector
from .fusion import fuse_resnet_blocks, fusion_supported
from .preprocess import EvalTransform, ImageInput, read_image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Detections:
    """One image's detections, best score first: ``boxes`` (N, 4) as (x0, y0, x1, y1) in pixels of the
    original image, ``scores`` (N,), ``labels`` (N,) and their class ``names``; all on the CPU."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    image_size: tuple[int, int]  # (height, width) of the original image

    def __len__(self) -> int:
        return len(self.scores)


def size_groups(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices of ``sizes`` in batches of at most ``batch_size``, similar sizes together (less padding)."""
    order = sorted(range(len(sizes)), key=lambda index: tuple(sizes[index]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Predictor:
    """Runs a detector on images: the evaluation resize and normalisation, batches of similar sizes,
    ``torch.inference_mode``, the head's own post-processing (DETR's softmax over classes, or Deformable
    DETR's top-k over query x class sigmoid scores), then a score threshold and a top-k per image.

    ``size`` / ``max_size``: the evaluation resize (shorter side / longest side, or the square's side, as
    ``input`` says; ``size=None`` keeps images as they are). ``input``: how the detector takes its images
    (its schema's record; None: DETR's, ImageNet-normalised and resized by the shorter side). ``dtype``: the weights and inputs are cast to it (float32, bfloat16 or
    float16). ``compile``: torch.compile the detector (each new padded shape compiles once, so batches
    are then padded to multiples of 32 unless ``size_divisibility`` says otherwise).
    ``fuse``: run a torchvision ResNet backbone with frozen BatchNorm as oneDNN-fused convolutions
    (``fusion.fuse_resnet_blocks``: norm, ReLU and residual add inside each conv, weights packed once
    per input shape; float32 gives the same numbers, bfloat16 rounds once where the plain path rounds
    after each step). None: where it applies (a CPU, float32 or bfloat16, not compiled); other
    backbones are left as they are, and so is everything with False. ``fused_blocks`` counts what was
    fused. The detector is prepared in place (eval mode, dtype, fusion or compilation); its state
    dict keys do not change.
    """

    def __init__(
        self,
        detector: Detector,
        class_names: Sequence[str],
        *,
        category_ids: Sequence[int] | None = None,
        size: int | None = None,
        max_size: int = 1333,
        threshold: float = 0.5,
        top_k: int | None = None,
        batch_size: int = 8,
        size_divisibility: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        compile: bool = False,
        fuse: bool | None = None,
        input: InputConfig | None = None,
    ):
        if len(class_names) != detector.num_classes:
            raise ValueError(f"{len(class_names)} class names for a detector of {detector.num_classes} classes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype = torch.device(device), as_dtype(dtype)
        self.detector = detector.eval().requires_grad_(False).to(self.device, self.dtype)
        self.detector.aux_loss = False  # only the last decoder layer's outputs are used
        supported = fusion_supported(self.device, self.dtype)
        if fuse and (compile or not supported):
            reason = "compile=True (inductor fuses on its own)" if compile else f"{self.device} / {self.dtype}"
            raise ValueError(f"fuse=True needs oneDNN on a CPU in float32 or bfloat16, uncompiled; got {reason}")
        self.fused_blocks = (
            fuse_resnet_blocks(self.detector) if (supported and not compile and fuse is not False) else 0
        )
        if compile:
            compile_in_place(self.detector)
            # padded sizes in few buckets, so that few graphs compile (as the training job does)
            size_divisibility = size_divisibility or COMPILE_SIZE_DIVISIBILITY
        self.class_names = [str(name) for name in class_names]
        self.category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
        self.transform = EvalTransform(size, max_size, input)
        self.threshold, self.top_k = check_selection(threshold, top_k)
        self.batch_size, self.size_divisibility = batch_size, size_divisibility

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, dilation: bool | None = None, allowed_targets: Sequence[str] = (), **options
    ) -> Predictor:
        """A predictor of a train.py checkpoint or any head's published weights (``load_detector``).

        The resize defaults to the source's evaluation size: none for train.py checkpoints of a detector resized
        by its shorter side, the run's square side for one evaluated on squares, for published weights DETR's
        800 / 1333 or RT-DETR's 640 x 640, as the detector's input record says. ``options`` are those of the constructor.
        """
        return cls.from_loaded(load_detector(path, dilation, allowed_targets), **options)

    @classmethod
    def from_loaded(cls, loaded: LoadedDetector, **options) -> Predictor:
        """A predictor of a detector read by ``load_detector``, with its classes, input record and evaluation resize."""
        options = {
            "size": loaded.size,
            "max_size": loaded.max_size,
            "category_ids": loaded.category_ids,
            "input": loaded.input,
            **options,
        }
        return cls(loaded.detector, loaded.class_names, **options)

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], *, threshold: float | None = None, top_k: int | None = None
    ) -> Detections | list[Detections]:
        """Detections of one image, or a list of them for a list (or a (B, 3, H, W) tensor) of images."""
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, Tensor) and images.dim() == 4)
        inputs = [self.transform(read_image(image)) for image in ([images] if single else images)]
        results: list[Detections | None] = [None] * len(inputs)
        for group in size_groups([tensor.shape[-2:] for tensor, _ in inputs], self.batch_size):
            batch = nested_tensor_from_tensor_list([inputs[index][0] for index in group], self.size_divisibility)
            original_sizes = torch.tensor([inputs[index][1] for index in group])
            for index, detections in zip(
                group, self.predict_batch(batch, original_sizes, threshold=threshold, top_k=top_k)
            ):
                results[index] = detections
        return results[0] if single else results

    @torch.inference_mode()
    def predict_batch(
        self, images: NestedTensor, original_sizes: Tensor, *, threshold: float | None = None, top_k: int | None = None
    ) -> list[Detections]:
        """Detections of a batch already resized, normalised and padded (as a DataLoader of the data module
        gives it); ``original_sizes`` (B, 2) as (h, w) sets the pixels the boxes are given in."""
        threshold, top_k = check_selection(
            self.threshold if threshold is None else threshold, self.top_k if top_k is None else top_k
        )
        outputs = self.detector(images.to(self.device, self.dtype, non_blocking=True))
        scores, labels, boxes = self.detector.detections(outputs, original_sizes.to(self.device))
        return ranked_detections(scores, labels, boxes, original_sizes, self.class_names, threshold, top_k)


def ranked_detections(
    scores: Tensor,
    labels: Tensor,
    boxes: Tensor,
    original_sizes: Tensor,
    class_names: Sequence[str],
    threshold: float = 0.0,
    top_k: int | None = None,
) -> list[Detections]:
    """A batch's detections (B, K) as one ``Detections`` per image: best first, at least ``threshold``, at most
    ``top_k``; boxes already in pixels of each original image, ``original_sizes`` (B, 2) as (h, w)."""
    found = []
    for image_scores, image_labels, image_boxes, size in zip(
        scores.cpu(), labels.cpu(), boxes.cpu(), original_sizes.tolist()
    ):
        order = image_scores.argsort(descending=True, stable=True)
        order = order[image_scores[order] >= threshold][:top_k]
        names = [class_names[label] for label in image_labels[order].tolist()]
        found.append(Detections(image_boxes[order], image_scores[order], image_labels[order], names, tuple(size)))
    return found


def check_selection(threshold: float, top_k: int | None) -> tuple[float, int | None]:
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in [0, 1]")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None: every detection above the threshold)")
    return threshold, top_k
