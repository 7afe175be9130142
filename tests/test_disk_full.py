"""A full disk (ENOSPC) while a run writes its checkpoint, prediction grid or logs: the run stops with one line
that names the folder and the space needed, the previous files are intact and no temporary file is left."""

from __future__ import annotations

import csv
import errno
import os
import re

import pytest
import torch
from PIL import Image

from detr_backbone.file_writes import DiskFullError
from detr_backbone.training.job import Job, validated

from .jobs import SMALL, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def no_space(stream) -> None:
    """What a write on a full disk does: a part of the data lands, then ENOSPC."""
    stream.write(b"part of the file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def on_disk(stream) -> bool:
    """A real file, not the byte counter that sizes a failed write."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def run(tmp_path, *overrides: str) -> DiskFullError:
    job = Job(validated(compose_config(*SMALL, *overrides)), tmp_path)
    with pytest.raises(DiskFullError) as error:
        job.run()
    message = str(error.value)
    assert "\n" not in message
    return error.value


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_last_ckpt(tmp_path, monkeypatch):
    save, saves = torch.save, []

    def save_until_the_disk_is_full(obj, stream, *args, **kwargs):
        if on_disk(stream):
            saves.append(obj["global_step"])
            if len(saves) == 2:
                no_space(stream)
        save(obj, stream, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    error = run(tmp_path, "callbacks.checkpoint.every_n_train_steps=1")
    folder = tmp_path / "checkpoints"
    needed = re.fullmatch(
        rf"no space left on device in {folder}: writing last\.ckpt needs ([0-9.]+) MB there, .* free; the previous last\.ckpt is intact",
        str(error),
    )
    assert needed, str(error)
    previous = folder / "last.ckpt"
    assert float(needed[1]) == pytest.approx(previous.stat().st_size / 1e6, abs=0.1)
    assert torch.load(previous, weights_only=True)["global_step"] == saves[0] == 1  # whole, from the step before
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt"]  # no temporary file


def test_prediction_grid_on_a_full_disk(tmp_path, monkeypatch):
    save = Image.Image.save

    def full_disk_save(image, stream, *args, **kwargs):
        if on_disk(stream):
            no_space(stream)
        save(image, stream, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk_save)
    error = run(tmp_path, "callbacks.predictions.enabled=true", "callbacks.predictions.num_images=2")
    folder = tmp_path / "predictions"
    assert re.fullmatch(
        rf"no space left on device in {folder}: writing epoch000\.png needs [0-9.]+ KB there, .* free", str(error)
    )
    assert list(folder.iterdir()) == []


def test_logs_on_a_full_disk(tmp_path, monkeypatch):
    def full_disk_rows(writer, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk_rows)
    error = run(tmp_path, "logger.csv=true")
    assert re.fullmatch(
        rf"no space left on device in {tmp_path}: writing the logs failed, .* free; the run's next checkpoint needs [0-9.]+ MB there",
        str(error),
    ), str(error)


def test_stale_temporary_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path):
    checkpoints, predictions = tmp_path / "checkpoints", tmp_path / "predictions"
    checkpoints.mkdir()
    predictions.mkdir()
    stale = [
        checkpoints / ".last.k3j2_x.tmp.ckpt",
        checkpoints / ".epoch000-val_map_500.0000.a1b2.tmp.ckpt",
        predictions / ".epoch003.zz9.tmp.png",
    ]
    for path in stale:
        path.write_bytes(b"half a file")
    kept = checkpoints / "notes.txt"
    kept.write_text("not ours")
    Job(validated(compose_config(*SMALL, "callbacks.predictions.enabled=true", "trainer.max_steps=1")), tmp_path).run()
    assert not [path for path in stale if path.exists()]
    assert kept.exists()
