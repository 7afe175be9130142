"""A train.py checkpoint small enough to train in seconds, for the tests that run a trained detector."""

from __future__ import annotations

from pathlib import Path

import torch

from detr_backbone.training.job import Job, validated

from .jobs import SMALL, compose_config

CLASS_NAMES = ["rectangle", "ellipse", "triangle"]
NUM_QUERIES = 5
# 40 optimizer steps of the SMALL job (a ResNet-18-GN cut after layer2, 32-48 px images) and one
# validation: about two seconds, and enough for some detections to overlap the shapes (AP above 0)
TINY_RUN = [
    *SMALL,
    "trainer.max_steps=40",
    "trainer.max_epochs=3",
    "trainer.num_sanity_val_steps=0",
    "data.train_size=32",
    "data.val_size=2",
    "callbacks.progress_bar=none",
    "callbacks.lr_monitor=false",
    "logger.csv=false",
]


# the multi-scale heads on layers 2-4 (three levels), as small as the DETR head above
MULTI_SCALE = [
    "model.num_feature_levels=3",
    f"model.num_queries={NUM_QUERIES}",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.dim_feedforward=64",
]
DINO_HEAD = ["model=dino_small", *MULTI_SCALE]  # the default job's head
DEFORMABLE_HEAD = ["model=deformable_detr_small", *MULTI_SCALE]
DEFAULT_HEAD = DINO_HEAD


def run_tiny_job(folder: Path, *overrides: str) -> Job:
    """The TINY_RUN job, run in ``folder``; ``overrides`` after TINY_RUN's: DINO_HEAD or DEFORMABLE_HEAD trains
    that head instead of DETR's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture: other test processes may share the two cores
    try:
        job = Job(validated(compose_config(*TINY_RUN, *overrides)), folder)
        job.run()
    finally:
        torch.set_num_threads(threads)
    return job


def train_tiny_checkpoint(folder: Path, *overrides: str) -> Path:
    """``overrides`` after TINY_RUN's: DINO_HEAD or DEFORMABLE_HEAD trains that head instead of DETR's."""
    run_tiny_job(folder, *overrides)
    return folder / "checkpoints" / "last.ckpt"
