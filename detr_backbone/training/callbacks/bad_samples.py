"""Images that could not be read and were replaced (``data.bad_samples=skip``): warned once per file,
counted in the log as ``data/bad_images``, and the run stopped once more than ``data.max_bad_fraction``
of a split's images are bad, which means a broken folder rather than a few damaged files.

The dataset marks each stand-in's target with the file it replaces (``data/bad_samples.py``); the
marks reach this callback with the batch, from loader workers too, so the count is the training
process's own. Under DDP each process counts its shard against its share of the limit.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from ...data.bad_samples import REPLACES

SHOWN_FILES = 3


class BadSampleWarning(UserWarning):
    """An image could not be read; another sample was trained on in its place."""


class BadSampleLimitError(ValueError):
    """More images could not be read than ``data.max_bad_fraction`` allows."""


def dataset_size(loaders: Any) -> int:
    loader = loaders[0] if isinstance(loaders, Sequence) else loaders
    return len(loader.dataset)


class BadSampleCount(Callback):
    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.bad: dict[str, set[str]] = {"train": set(), "val": set()}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.count(trainer, "train", batch, dataset_size(trainer.train_dataloader))
        total = len(self.bad["train"] | self.bad["val"])
        if total:
            pl_module.log("data/bad_images", float(total), on_step=True, on_epoch=False)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self.count(trainer, "val", batch, dataset_size(trainer.val_dataloaders))

    def count(self, trainer: pl.Trainer, split: str, batch: Any, size: int) -> None:
        _, targets = batch
        replaced = {str(target[REPLACES]) for target in targets if REPLACES in target}
        for path in sorted(replaced - self.bad["train"] - self.bad["val"]):
            warnings.warn(
                f"{path} cannot be read; a stand-in sample was used in its place", BadSampleWarning, stacklevel=2
            )
        self.bad[split] |= replaced
        share = self.max_fraction * size / trainer.world_size
        # every process decides together, so that none waits for the others in the next collective
        if trainer.strategy.reduce_boolean_decision(len(self.bad[split]) > share, all=False):
            shown = ", ".join(sorted(self.bad[split])[:SHOWN_FILES]) or "on another process"
            raise BadSampleLimitError(
                f"{len(self.bad[split])} of the {size} {split} images could not be read, more than "
                f"data.max_bad_fraction={self.max_fraction} of them ({shown}); list every problem of the folder with "
                "python -m detr_backbone verify <images> <annotations.json>"
            )
