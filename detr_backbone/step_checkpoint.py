"""``last.ckpt`` every n training steps, so that a killed run loses at most n steps, not an epoch."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` (with the train loader's position) every ``every_n_train_steps`` steps.

    It shares ``last.ckpt`` with the epoch checkpoint, which rewrites it after each validation;
    that one also owns the file at the end of training, so this one adds no save there.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int):
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,  # overwrite last.ckpt, never last-v1.ckpt
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass
