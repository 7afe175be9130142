"""A DDP job of two CPU processes accumulating two batches a step; each rank writes <folder>/rank<N>.pt with its
weights before and after training. Run as ``python -m tests.ddp_weights <folder>`` (Lightning starts rank 1
with the same command line)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from detr_backbone.training.job import Job, validated

from .jobs import SMALL, compose_config

OVERRIDES = (
    *SMALL,
    "data.min_size=40",
    "data.max_size=40",
    "data.batch_size=1",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.accumulate_grad_batches=2",
    "trainer.num_sanity_val_steps=0",
    "callbacks.lr_monitor=false",
)


class RankWeights(pl.Callback):
    def __init__(self, folder: Path):
        self.folder = folder

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial = {name: tensor.clone() for name, tensor in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        state = {"global_step": trainer.global_step, "weights": pl_module.state_dict(), "initial": self.initial}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    job = Job(validated(compose_config(*OVERRIDES)), folder / "run")
    job.trainer.callbacks.append(RankWeights(folder))
    job.run()
