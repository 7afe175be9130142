"""Never train on silently after a NaN or infinite loss: stop with the step named, or skip the step."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

NON_FINITE_ACTIONS = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Checks every training loss before the optimizer step.

    ``action="stop"`` raises ``NonFiniteLossError`` naming the step, before the bad gradients reach
    the weights. ``action="skip"`` drops the step's gradients, so the optimizer leaves weights and
    moments as they were, and counts the skipped steps in ``skipped_steps``. Under DDP the
    processes decide together (one bad loss poisons every process's all-reduced gradients).
    """

    def __init__(self, action: str = "stop"):
        if action not in NON_FINITE_ACTIONS:
            raise ValueError(f"non-finite loss action {action!r} is not one of {', '.join(NON_FINITE_ACTIONS)}")
        self.action = action
        self.skipped_steps = 0
        self._bad_loss: float | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # With gradient accumulation several backwards feed one step: any bad one spoils it.
        value = loss.detach()
        if self._bad_loss is None and not torch.isfinite(value).all():
            self._bad_loss = float(value.float().sum())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        bad_loss, self._bad_loss = self._bad_loss, None
        if not trainer.strategy.reduce_boolean_decision(bad_loss is not None, all=False):
            return
        where = (
            f"global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx})"
        )
        loss = "non-finite on another process" if bad_loss is None else str(bad_loss)
        if self.action == "stop":
            raise NonFiniteLossError(
                f"training loss is {loss} at {where}; the weights are those of the step before. "
                "Set callbacks.non_finite_loss=skip to skip such steps instead"
            )
        optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left alone by the optimizer
        self.skipped_steps += 1
        pl.utilities.rank_zero_warn(f"skipped the optimizer step at {where}: training loss is {loss}")
