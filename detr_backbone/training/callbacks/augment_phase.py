"""Tells the train set's augmentation policy where the run is, at every epoch start (data/augment.py)."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


def run_progress(trainer: pl.Trainer) -> float:
    """The fraction of the run done: epochs over max_epochs or optimizer steps over max_steps, whichever ends it first."""
    fractions = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        fractions.append(trainer.current_epoch / trainer.max_epochs)
    if trainer.max_steps > 0:
        fractions.append(trainer.global_step / trainer.max_steps)
    return min(max(fractions, default=0.0), 1.0)


class AugmentPhase(Callback):
    """Writes (epoch, progress) into the policy's shared state before the epoch's first batch is drawn.

    Lightning calls ``on_train_epoch_start`` before it asks the train loader for the epoch's batches, so
    workers, persistent ones too, transform every batch of the epoch in its phase; a resumed run computes
    its progress from the restored epoch and step, so it is in the phase it left.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule = getattr(trainer.datamodule, "augment_schedule", None)
        if schedule is not None:
            schedule.state.set(trainer.current_epoch, run_progress(trainer))
