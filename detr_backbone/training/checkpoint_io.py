"""Checkpoint writes that are all or nothing: a killed or failing write never leaves a corrupt file.

Lightning's own writer opens the target path and writes into it, or stages it in the system's
temporary folder and moves it across file systems; a process killed meanwhile can leave a
truncated ``last.ckpt``, the very file a resume needs. Here the checkpoint is written by
``file_writes.atomic_write``: readers see the old checkpoint or the new one, never a part.
"""

from __future__ import annotations

import os
import zipfile
from functools import partial
from typing import Any, Optional

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ..file_writes import atomic_write


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically: ``path`` keeps its old content if anything fails, and a full
    disk raises a ``DiskFullError`` naming the folder and the checkpoint's size."""
    atomic_write(path, partial(torch.save, obj))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with local checkpoints written by ``atomic_torch_save``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote storage: Lightning's fsspec writer handles it
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


def check_resume_checkpoint(path: str | os.PathLike) -> None:
    """Fail early, in one line, when ``ckpt_path`` cannot be resumed from: missing or cut short.

    ``torch.save`` writes a zip archive whose directory sits at the very end, so a file cut short
    (a write killed before atomic writes, a partial copy) is recognised without reading it whole.
    """
    if not os.path.isfile(path):
        raise ValueError(
            f"ckpt_path={os.fspath(path)!r} does not exist; give a checkpoint file such as <run>/checkpoints/last.ckpt"
        )
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"ckpt_path={os.fspath(path)!r} is not a complete checkpoint (truncated or not written by torch.save); "
            "resume from another one, e.g. the best epoch checkpoint in the same folder"
        )
