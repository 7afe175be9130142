"""Tells the train set's augmentation policy where the run is, at every epoch start (data/augment.py)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


def run_progress(trainer: pl.Trainer) -> float:
    """The fraction of the run done when the current epoch started: epochs over max_epochs, or optimizer steps
    over max_steps, whichever ends the run first. A function of the epoch alone, so a run resumed mid-epoch
    gets the value the epoch started with."""
    epoch = trainer.current_epoch
    fractions = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        fractions.append(epoch / trainer.max_epochs)
    if trainer.max_steps > 0 and math.isfinite(trainer.num_training_batches):
        steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        fractions.append(epoch * steps_per_epoch / trainer.max_steps)
    return min(max(fractions, default=0.0), 1.0)


class AugmentPhase(Callback):
    """Writes (epoch, progress) into the policy's shared state before the epoch's first batch is drawn.

    Lightning calls ``on_train_epoch_start`` before it asks the train loader for the epoch's batches, so
    workers, persistent ones too, transform every batch of the epoch in its phase. A run resumed mid-epoch
    skips that hook for its first epoch: ``on_train_start``, after the checkpoint is restored, sets it then.
    """

    def _set(self, trainer: pl.Trainer) -> None:
        schedule = getattr(trainer.datamodule, "augment_schedule", None)
        if schedule is not None:
            schedule.state.set(trainer.current_epoch, run_progress(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(trainer)
