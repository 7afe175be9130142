"""An exponential moving average of the detector's weights (``callbacks.ema``), on timm's ``ModelEmaV3``.

With the average on, validation runs it, so the monitored metric and the best checkpoint are the
average's, and a checkpoint's ``state_dict`` holds it: ``predict``, ``evaluate``, ``export``,
``init_from`` and ``load_from_checkpoint`` read the averaged weights without knowing about it. The
weights being trained travel in the same checkpoint under ``TRAINING_WEIGHTS_KEY``, so a resume
restores both, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from ...inference.checkpoint import TRAINING_PREFIX

TRAINING_WEIGHTS_KEY = "training_state_dict"  # the module's trained tensors, where state_dict holds the average


class WarmedUpEma(ModelEmaV3):
    """timm's average (floating-point tensors of the state dict, buffers such as BatchNorm statistics
    included, are interpolated; integer ones copied) kept in float32 whatever the model's dtype, with
    the decay warm-up of RT-DETR's and D-FINE's ModelEMA instead of timm's own:
    ``decay * (1 - exp(-updates / warmup_steps))``, ``updates`` counting this one."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int):
        super().__init__(model, decay=decay, dtype=torch.float32)
        self.module.requires_grad_(False)
        self.warmup_steps = warmup_steps

    def get_decay(self, step: Optional[int] = None) -> float:
        if step is None or self.warmup_steps == 0:
            return self.decay
        return self.decay * (1 - math.exp(-step / self.warmup_steps))


class EmaWeights(Callback):
    """The average of ``pl_module.detector``, updated after every optimizer step (not every batch, so
    gradient accumulation counts steps), swapped into the detector for validation and for good when
    training ends.

    ``decay=None`` keeps no average; the callback is then only there so that resuming, with the
    average off, a checkpoint written with it on continues from the trained weights, not the average.
    """

    def __init__(self, decay: Optional[float] = None, warmup_steps: int = 0):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.ema: Optional[WarmedUpEma] = None
        self.updates = 0
        self._stepped_at = 0  # the global step of the last update
        self._restored: Optional[dict[str, Tensor]] = None  # a resumed checkpoint's average, until the EMA exists
        self._trained: Optional[list[Tensor]] = None  # the detector's own tensors while it holds the average

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decay is None:
            return
        # here, not in setup: the strategy has moved the detector to its device
        self.ema = WarmedUpEma(pl_module.detector, self.decay, self.warmup_steps)
        if self._restored is not None:
            self.ema.module.load_state_dict(self._restored)
            self._restored = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stepped_at = trainer.global_step  # restored by now on a resume

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.ema is None or trainer.global_step == self._stepped_at:  # a batch that only accumulated
            return
        self._stepped_at = trainer.global_step
        self.updates += 1
        self.ema.update(pl_module.detector, step=self.updates)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swap_in(pl_module.detector)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.swap_out(pl_module.detector)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swap_in(pl_module.detector)  # what a test after fitting, or the caller, runs

    @torch.no_grad()
    def swap_in(self, detector: nn.Module) -> None:
        if self.ema is None or self._trained is not None:
            return
        tensors = list(detector.state_dict().values())
        self._trained = [tensor.clone() for tensor in tensors]
        for tensor, averaged in zip(tensors, self.ema.module.state_dict().values()):
            tensor.copy_(averaged)

    @torch.no_grad()
    def swap_out(self, detector: nn.Module) -> None:
        if self._trained is None:
            return
        for tensor, trained in zip(detector.state_dict().values(), self._trained):
            tensor.copy_(trained)
        self._trained = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.ema is None else {"updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = state_dict["updates"]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.ema is None:
            return
        state = checkpoint["state_dict"]
        if self._trained is not None:  # the detector holds the average: its trained tensors are set aside
            names = pl_module.detector.state_dict().keys()
            state = {**state, **{TRAINING_PREFIX + name: tensor for name, tensor in zip(names, self._trained)}}
        averaged = {TRAINING_PREFIX + name: tensor for name, tensor in self.ema.module.state_dict().items()}
        checkpoint[TRAINING_WEIGHTS_KEY] = state
        checkpoint["state_dict"] = {**state, **averaged}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        trained = checkpoint.get(TRAINING_WEIGHTS_KEY)
        if trainer.state.fn != TrainerFn.FITTING or not isinstance(trained, Mapping):
            return  # testing or validating a checkpoint runs its average; one without EMA holds only one set
        # Lightning has loaded state_dict, the average, into the module: training goes on from the trained weights
        pl_module.load_state_dict(trained)
        if self.decay is None:
            rank_zero_warn(
                "the checkpoint was written with callbacks.ema.enabled=true and the run resumes with it off: "
                "training continues from its trained weights, and its average is dropped"
            )
            return
        averaged = checkpoint["state_dict"]
        self._restored = {
            name.removeprefix(TRAINING_PREFIX): tensor
            for name, tensor in averaged.items()
            if name.startswith(TRAINING_PREFIX)
        }
