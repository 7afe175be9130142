"""Fixtures shared by test modules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: the CI box has two cores and other test processes may share them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- trained once for the whole session: several files read the same tiny checkpoint ---------------
# Nothing may write into these runs' folders: a test that needs a changed copy writes it under its own tmp_path.


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The last.ckpt of the TINY_RUN job with DETR's head (tests/tiny_checkpoint.py): predicted, evaluated,
    exported and validated by test_commands.py, test_inference.py, test_export.py and test_coco_backends.py."""
    from .tiny_checkpoint import train_tiny_checkpoint  # here: a file that needs no job does not import Lightning

    return train_tiny_checkpoint(tmp_path_factory.mktemp("tiny_detr"))


@pytest.fixture(scope="session")
def tiny_dino_run(tmp_path_factory):
    """The TINY_RUN job with DINO's head (the default job's), after its run: its Job (trainer and module) for
    test_dino.py, its last.ckpt for test_dino.py and test_export.py."""
    from .tiny_checkpoint import DINO_HEAD, run_tiny_job

    return run_tiny_job(tmp_path_factory.mktemp("tiny_dino"), *DINO_HEAD)


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> SimpleNamespace:
    """train.py with DDP on two CPU processes (test_distributed.DDP_RUN), run once for test_distributed.py (the
    checkpoint and the synced metrics) and test_visual.py (one grid an epoch, one part summary): its completed
    process and its run folder."""
    from .test_distributed import DDP_RUN, run_train

    folder = tmp_path_factory.mktemp("ddp")
    result = run_train(folder, *DDP_RUN, f"hydra.run.dir={folder}/run")
    return SimpleNamespace(result=result, dir=folder / "run")
