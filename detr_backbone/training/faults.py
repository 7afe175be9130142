"""What a long run does about the faults it meets: the callbacks that handle them, and the one-line
exceptions a fit ends with when it cannot go on (preemption, a full disk)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..file_writes import disk_full_error
from .callbacks.bad_samples import BadSampleCount
from .callbacks.preemption import Preemption
from .callbacks.saved_config import NO_COMMAND_LINE, CommandLine, SavedConfig
from .config import Config


def fault_callbacks(cfg: Config, run_dir: Path, command_line: CommandLine = NO_COMMAND_LINE) -> list[Callback]:
    return [
        SavedConfig(asdict(cfg), command_line),  # a resume is checked against it, and composed from it (resume.py)
        Preemption(run_dir / "checkpoints" / "last.ckpt", cfg.callbacks.slurm_requeue),
        BadSampleCount(cfg.data.max_bad_fraction),
    ]


def state_size(trainer: pl.Trainer) -> Optional[int]:
    """About the size of a checkpoint of the run: the module's state and the optimizer's."""
    if trainer.lightning_module is None:
        return None
    tensors = list(trainer.lightning_module.state_dict().values())
    for optimizer in trainer.optimizers:
        tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


@contextmanager
def ended_cleanly(trainer: pl.Trainer, run_dir: Path) -> Iterator[None]:
    """A fit stopped by a signal ends in ``Preempted``, one stopped by a full disk in ``DiskFullError``."""
    try:
        yield
    except SIGTERMException:
        preemption = next(callback for callback in trainer.callbacks if isinstance(callback, Preemption))
        raise preemption.stopped(trainer) from None
    except OSError as error:
        full = disk_full_error(error, run_dir, state_size(trainer))
        if full is None or full is error:
            raise
        # a full disk found among the errors a later write raised while handling it, or one made from ENOSPC
        raise full from (None if full.__traceback__ else error)
