"""The learning-rate schedules: DETR's step drop, cosine and flat-cosine (D-FINE's and DEIM's), each after an
optional warm-up, linear or (DEIM's) quadratic.

All are one ``torch.optim.lr_scheduler.LambdaLR`` stepped after every optimizer step, whose factor is a
pure function of the step (:class:`LrFactor`); a checkpoint saves the step, so a resumed run goes on at the
lr it stopped at. The points where a schedule changes are fractions of the run, so the same preset serves a
run of 500 steps and one of 500,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..validation import require

SCHEDULES = ("step", "cosine", "flat_cosine")
DROP_FACTOR = 0.1  # DETR's: the lr drops tenfold every lr_drop epochs


@dataclass
class ScheduleConfig:
    """``optimizer.*`` of train.py: the lr's course over the run (the peak lr is ``lr``, ``lr_backbone``, ...)."""

    schedule: str = "step"  # step (DETR's tenfold drop every lr_drop epochs) | cosine | flat_cosine
    warmup_steps: int = 0  # warm-up: optimizer step s (from 0) runs at ((s + 1) / warmup_steps)^warmup_power of the lr
    warmup_power: float = 1.0  # 1: linear warm-up; 2: quadratic, DEIM's
    min_lr_ratio: float = 0.0  # cosine, flat_cosine: the lr at the end of the decay, as a fraction of the peak
    flat_fraction: float = 0.5  # flat_cosine: the peak lr holds until this fraction of the run (DEIM: 29 of 58 epochs)
    decay_end: float = 1.0  # cosine, flat_cosine: the decay reaches min_lr_ratio here and stays (DEIM: 50 of 58)

    def __post_init__(self) -> None:
        require(
            self.schedule in SCHEDULES,
            f"optimizer.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}",
        )
        require(self.warmup_steps >= 0, f"optimizer.warmup_steps={self.warmup_steps} must be >= 0 (0: no warm-up)")
        require(
            self.warmup_power > 0, f"optimizer.warmup_power={self.warmup_power} must be > 0 (1: linear, 2: quadratic)"
        )
        require(0 <= self.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        require(
            0 <= self.flat_fraction < self.decay_end <= 1,
            f"optimizer.flat_fraction={self.flat_fraction} and optimizer.decay_end={self.decay_end} "
            "must satisfy 0 <= flat_fraction < decay_end <= 1 (fractions of the run)",
        )


@dataclass(frozen=True)
class LrFactor:
    """The lr of optimizer step ``step`` (from 0) as a fraction of the peak, for a run of ``total_steps``."""

    schedule: str
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    warmup_power: float
    lr_drop: int  # step: epochs between drops
    min_lr_ratio: float
    flat_fraction: float
    decay_end: float

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) ** self.warmup_power if self.warmup_steps else 1.0
        return warmup * self.course(step)

    def course(self, step: int) -> float:
        if self.schedule == "step":
            return DROP_FACTOR ** (step // self.steps_per_epoch // self.lr_drop)
        # cosine decays from the end of the warm-up, flat_cosine from flat_fraction of the run
        start = self.warmup_steps if self.schedule == "cosine" else round(self.flat_fraction * self.total_steps)
        end = max(start + 1, round(self.decay_end * self.total_steps))
        progress = min(1.0, max(0.0, (step - start) / (end - start)))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def at_peak(step: int) -> float:
    return 1.0


class RunSchedule(LambdaLR):
    """``LambdaLR`` over one :class:`LrFactor` for every parameter group.

    Built before the run's length is known (Lightning's ``estimated_stepping_batches`` in
    ``configure_optimizers`` would build the train loader before a resumed run restores its position in it),
    it holds the peak lr until :meth:`fit_to_run` gives it the length, when training starts. Its state is the
    step and the peak lrs: a resumed run fits the config's schedule to its own length again.
    """

    def __init__(self, optimizer: Optimizer, config: ScheduleConfig, lr_drop: int) -> None:
        fields = {
            name: getattr(config, name)
            for name in ("warmup_steps", "warmup_power", "min_lr_ratio", "flat_fraction", "decay_end")
        }
        self.planned = LrFactor(config.schedule, 0, 1, lr_drop=lr_drop, **fields)
        self.epochs_done: int | None = None  # set by a checkpoint of the epoch-wise StepLR of earlier versions
        super().__init__(optimizer, at_peak)

    def fit_to_run(self, total_steps: float, steps_per_epoch: int) -> None:
        """Follow the schedule over a run of ``total_steps`` optimizer steps (inf: no end set), ``steps_per_epoch``
        an epoch, from the current step on."""
        schedule = self.planned.schedule
        require(
            schedule == "step" or math.isfinite(total_steps),
            f"optimizer.schedule={schedule} needs the run's length: set trainer.max_epochs or trainer.max_steps",
        )
        total = int(total_steps) if math.isfinite(total_steps) else 0
        factor = replace(self.planned, total_steps=total, steps_per_epoch=max(1, steps_per_epoch))
        if self.epochs_done is not None:
            self.last_epoch, self.epochs_done = self.epochs_done * factor.steps_per_epoch, None
        self.lr_lambdas = [factor] * len(self.optimizer.param_groups)
        self._last_lr = [base * factor(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in ("base_lrs", "last_epoch", "_step_count")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_lrs = state_dict["base_lrs"]
        if "step_size" in state_dict:  # StepLR's: last_epoch counted epochs
            self.epochs_done = state_dict["last_epoch"]
        else:
            self.last_epoch, self._step_count = state_dict["last_epoch"], state_dict["_step_count"]
