"""``last.ckpt``: the latest state of the run, after every epoch and, optionally, every n steps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn

from ...file_writes import remove_stale_temporaries


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` at the end of every training epoch (after its validation) and, with
    ``every_n_train_steps``, every n steps as well, the train loader's position included, so that a
    killed run loses at most n steps.

    Lightning's ``ModelCheckpoint(save_last=True)`` with a monitored metric rewrites ``last.ckpt``
    only in the epochs where it also saved a top-k checkpoint; a resume could go back many epochs.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: Optional[int] = None):
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,  # overwrite last.ckpt, never write last-v1.ckpt
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None:  # no write of this run has begun yet
            remove_stale_temporaries(self.dirpath)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's save of a last.ckpt not yet written when training ends ignores fast_dev_run
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)
