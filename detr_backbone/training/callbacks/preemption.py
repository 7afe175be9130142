"""A run told to go away ends at a step boundary with ``last.ckpt`` written there, and under SLURM requeues itself.

Lightning handles SIGTERM (preemption, ``scancel``, a spot instance going away): it finishes the
step under way and raises ``SIGTERMException`` between steps, on every process of a DDP run, but
writes nothing. Under SLURM it also answers the warning signal (``sbatch --signal=USR1@120``) by
writing ``hpc_ckpt_<n>.ckpt`` from inside the signal handler, that is in the middle of a step, where
weights, optimizer, step count and data position need not agree, and by requeueing the job. Here
the warning takes Lightning's SIGTERM path too, and the checkpoint is ``last.ckpt``, written once the
step is whole, the file a resume reads; then the job requeues itself (``callbacks.slurm_requeue``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

WARNING_SIGNAL: Optional[signal.Signals] = getattr(signal, "SIGUSR1", None)  # SLURM's, and Lightning's requeue signal


class Preempted(Exception):
    """The run stopped on a signal, its state in ``last.ckpt``; a process that ends on it exits with
    ``exit_status``, 128 + the signal, as one the signal had killed."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number


def cluster_plugins() -> list[Any]:
    """Lightning's SLURM environment without its own requeue (``Preemption`` requeues), when under SLURM."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def slurm_job_id() -> str:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]


class Preemption(Callback):
    """On SIGTERM or the warning signal: ``last_checkpoint`` written at the end of the current step, and
    on the warning under SLURM with ``requeue``, ``scontrol requeue`` of the job (global rank zero)."""

    def __init__(self, last_checkpoint: str | Path, requeue: bool = True):
        self.last_checkpoint = Path(last_checkpoint)
        self.requeue = requeue
        self.signal: Optional[signal.Signals] = None  # the one that stopped the run
        self.saved: Optional[Path] = None
        self.requeued: Optional[str] = None  # the job id, once requeued

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has set its handlers by now and restores the ones from before when the fit ends
        if WARNING_SIGNAL is not None and threading.current_thread() is threading.main_thread():
            signal.signal(WARNING_SIGNAL, self._on_warning)

    def _on_warning(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signal = signal.Signals(signum)
        signal.raise_signal(signal.SIGTERM)  # Lightning's stop: after the current step, on every process

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.signal = self.signal or signal.SIGTERM
        if trainer.state.fn == TrainerFn.FITTING and not (trainer.sanity_checking or trainer.fast_dev_run):
            trainer.save_checkpoint(self.last_checkpoint)  # every process takes part; global zero writes
            self.saved = self.last_checkpoint
        if self.requeue and self.signal == WARNING_SIGNAL and SLURMEnvironment.detect() and trainer.is_global_zero:
            job = slurm_job_id()
            status = subprocess.run(["scontrol", "requeue", job], check=False).returncode
            if status == 0:
                self.requeued = job
            else:
                rank_zero_info(f"scontrol requeue {job} failed with exit status {status}")

    def stopped(self, trainer: pl.Trainer) -> Preempted:
        """The run's end, described: where it stopped, what it wrote, how it goes on."""
        stopper = self.signal or signal.SIGTERM
        if self.saved is None:  # before the first step, or once training was over (while testing)
            state = (
                "before training began"
                if trainer.global_step == 0
                else "after training, whose checkpoints are complete"
            )
            return Preempted(f"stopped by {stopper.name} {state}", stopper)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, after {done} of its {trainer.num_training_batches} batches)"
        if self.requeued:
            then = f"requeued SLURM job {self.requeued}, which resumes from it"
        else:
            then = f"resume with ckpt_path={self.saved} (or hydra.run.dir=<this run> ckpt_path=last)"
        return Preempted(f"stopped by {stopper.name} at {where}; {self.saved} holds that step; {then}", stopper)
