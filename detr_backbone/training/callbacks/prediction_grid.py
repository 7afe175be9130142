"""After each validation, a PNG grid of a few fixed validation images with ground-truth boxes
(green) and the detector's boxes above a score threshold (red, captioned "class score")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from ...data.visualize import PREDICTION_COLOR, draw_boxes, target_panel, tile_grid, write_png
from ...detection.boxes import per_image
from ...file_writes import atomic_write, remove_stale_temporaries
from ...nested_tensor import NestedTensor
from ..loggers import log_image

PANELS_PER_ROW = 4


def class_name(label: int, class_names: Sequence[str] | None) -> str:
    return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)


def prediction_panel(
    image: Tensor,
    target: Mapping[str, Tensor],
    detection: Mapping[str, Tensor],
    class_names: Sequence[str] | None,
    score_threshold: float,
    side: int,
    normalized: bool = True,
) -> Tensor:
    """One padded model input (3, H, W), ImageNet-``normalized`` or pixels / 255, as uint8 pixels of its unpadded region, scaled to
    ``side`` on its longer side, with its target's boxes and the detections scoring >= ``score_threshold``.

    ``target`` holds DETR's normalized cxcywh ``boxes`` and the unpadded ``size`` (h, w); ``detection``
    holds ``scores``, ``labels`` and XYXY ``boxes`` in pixels of that unpadded image.
    """
    panel, scale = target_panel(image, target, [""] * len(target["boxes"]), side, normalized)
    keep = detection["scores"] >= score_threshold
    captions = [
        f"{class_name(int(label), class_names)} {float(score):.2f}"
        for label, score in zip(detection["labels"][keep], detection["scores"][keep])
    ]
    return draw_boxes(panel, detection["boxes"][keep].float().cpu() * scale, captions, PREDICTION_COLOR)


class PredictionGrid(Callback):
    """Writes ``folder/epochNNN.png`` (0-based epoch, as in checkpoint names) after every validation
    of a fit, on the global-zero process only, and hands it as ``val/predictions`` to every logger that
    keeps images (TensorBoard, W&B, MLflow).

    The images are the first ``num_images`` of the validation set, collated once and reused, so
    the grids of successive epochs show the same images and cost one small forward pass each.
    """

    def __init__(self, folder: Path, num_images: int = 4, score_threshold: float = 0.5, image_side: int = 256):
        self.folder = Path(folder)
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.image_side = image_side
        self._batch: tuple[NestedTensor, list[Mapping[str, Tensor]], Sequence[str] | None] | None = None

    def fixed_batch(self, trainer: pl.Trainer) -> tuple[NestedTensor, list[Mapping[str, Tensor]], Sequence[str] | None]:
        """The first validation images as one batch, through the validation loader's own collate."""
        if self._batch is None:
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, Sequence) else loader
            dataset = loader.dataset
            samples = [dataset[index] for index in range(min(self.num_images, len(dataset)))]
            images, targets = loader.collate_fn(samples)
            self._batch = images, targets, getattr(dataset, "class_names", None)
        return self._batch

    def render(self, trainer: pl.Trainer, module: pl.LightningModule) -> Tensor:
        """The grid as a uint8 (3, H, W) image."""
        images, targets, class_names = self.fixed_batch(trainer)
        was_training = module.training
        module.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            outputs = module(images.to(module.device))
        module.train(was_training)
        sizes = torch.stack([target["size"] for target in targets]).to(module.device)
        detections = per_image(*module.detector.detections(outputs, sizes))
        normalized = module.config.head.input.normalize  # the detector's own input record
        panels = [
            prediction_panel(image, target, detection, class_names, self.score_threshold, self.image_side, normalized)
            for image, target, detection in zip(images.tensors, targets, detections)
        ]
        return tile_grid(panels, nrow=min(len(panels), PANELS_PER_ROW))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # before this run writes any grid: what is there was left by a killed one
            remove_stale_temporaries(self.folder)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        grid = self.render(trainer, pl_module)
        atomic_write(self.folder / f"epoch{trainer.current_epoch:03d}.png", partial(write_png, grid))
        for logger in trainer.loggers:
            log_image(logger, "val/predictions", grid, trainer.global_step)
