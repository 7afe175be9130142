"""Faults: a run killed mid-epoch resumes exactly, checkpoint writes are atomic, NaN losses never train on."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import weakref
from types import SimpleNamespace

import pytest
import torch

from detr_backbone.data import EpochShuffleSampler, ShapesDataset
from detr_backbone.data.resumable import ResumableDataLoader
from detr_backbone.training.callbacks.loss_guard import NonFiniteLossError, NonFiniteLossGuard
from detr_backbone.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from detr_backbone.training.job import Job, validated
from detr_backbone.training.module import DetrModule

from .jobs import ROOT, SMALL, compose_config

# 6 images in batches of 2: 3 steps per epoch, last.ckpt every 2 steps (and after each epoch), two epochs.
RESUMABLE = (*SMALL, "data.train_size=6", "trainer.max_epochs=2", "callbacks.checkpoint.every_n_train_steps=2")

# Runs train.py, but the training data blocks at its n-th sample after touching a marker file,
# so the test knows where the run is when it kills it.
BLOCKING_TRAIN = """
import runpy, sys, time
from pathlib import Path

from detr_backbone.data.shapes import ShapesDataset

marker, block_at, train_py = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
fetched = 0
original = ShapesDataset.__getitem__

def blocking_getitem(self, index):
    global fetched
    if self.split == "train":
        if fetched == block_at:
            marker.touch()
            time.sleep(600)
        fetched += 1
    return original(self, index)

ShapesDataset.__getitem__ = blocking_getitem
sys.argv = [train_py, *sys.argv[4:]]
runpy.run_path(train_py, run_name="__main__")
"""


def record_train_samples(monkeypatch) -> list[int]:
    """The indices of the training samples the job loads, in order."""
    seen: list[int] = []
    original = ShapesDataset.__getitem__

    def recording_getitem(self, index):
        if self.split == "train":
            seen.append(index)
        return original(self, index)

    monkeypatch.setattr(ShapesDataset, "__getitem__", recording_getitem)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["none", "deim"])  # deim: flip and resize in epoch 0, RT-DETR's in epoch 1
def test_run_killed_mid_epoch_resumes_with_the_uninterrupted_order_and_weights(tmp_path, monkeypatch, augment):
    resumable = (*RESUMABLE, f"data.augment={augment}")
    seen = record_train_samples(monkeypatch)
    straight = Job(validated(compose_config(*resumable)), tmp_path / "straight")
    straight.run()
    straight_order = list(seen)
    assert len(straight_order) == 12

    # The killed run blocks on sample 8: epoch 1, after 1 of its 3 batches; last.ckpt is from step 4.
    marker = tmp_path / "blocked"
    (tmp_path / "blocking_train.py").write_text(BLOCKING_TRAIN)
    killed = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "blocking_train.py"),
            str(marker),
            "8",
            str(ROOT / "train.py"),
            *resumable,
            f"hydra.run.dir={tmp_path}/killed",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), killed.stderr.read() if killed.poll() is not None else "the run never reached sample 8"
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL

    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (4, 1)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"batches": 1, "batch_size": 2, "replicas": 1}
    ]
    assert not list(last.parent.glob(".*.tmp"))

    seen.clear()
    resumed = Job(validated(compose_config(*resumable, f"ckpt_path={last}")), tmp_path / "resumed")
    resumed.run()
    assert seen == straight_order[8:]  # the rest of epoch 1, in the uninterrupted order, nothing twice
    assert resumed.trainer.global_step == straight.trainer.global_step == 6
    assert resumed.trainer.current_epoch == 2
    steps = {int(state["step"]) for state in resumed.trainer.optimizers[0].state.values()}
    assert steps == {6}
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("replicas", "workers"), [(1, 0), (2, 0), (1, 1)])
def test_loader_state_skips_the_batches_already_handed_out(replicas, workers):
    dataset = list(range(22))

    def loaders():
        samplers = [EpochShuffleSampler(dataset, seed=3) for _ in range(replicas)]
        if replicas > 1:  # what Lightning does under DDP: shard the sampler's order per process
            from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

            samplers = [
                DistributedSamplerWrapper(s, num_replicas=replicas, rank=r, shuffle=False)
                for r, s in enumerate(samplers)
            ]
        options = {"num_workers": workers, "persistent_workers": workers > 0}
        return [ResumableDataLoader(dataset, batch_size=3, sampler=s, **options) for s in samplers]

    def epoch_pass(loader, epoch):
        """Lightning's order on resume: ``iter`` first, ``set_epoch`` (forwarded by the wrapper) after."""
        iterator = iter(loader)
        loader.sampler.set_epoch(epoch)
        return iterator

    full = [[batch.tolist() for batch in epoch_pass(loader, 5)] for loader in loaders()]
    for rank, loader in enumerate(interrupted := loaders()):
        iterator = epoch_pass(loader, 5)
        for _ in range(2):
            next(iterator)
        assert loader.state_dict() == {"batches": 2, "batch_size": 3, "replicas": replicas}
        resumed = loaders()[rank]
        resumed.load_state_dict(loader.state_dict())
        assert [batch.tolist() for batch in epoch_pass(resumed, 5)] == full[rank][2:]
        assert resumed.state_dict()["batches"] == len(full[rank])
        assert [batch.tolist() for batch in epoch_pass(resumed, 5)] == full[rank]  # the next pass is whole again
    with pytest.raises(ValueError, match=f"position 99 is outside this loader's {len(full[0])} batches"):
        interrupted[0].load_state_dict({"batches": 99})


def test_a_dropped_loader_stops_its_persistent_workers_at_once():
    """No reference cycle between the loader and its workers' iterator: the loader goes with its last reference,
    and its worker with it, without waiting for the garbage collector (whose shutdown waits out a 5 s timeout)."""
    loader = ResumableDataLoader(list(range(10)), batch_size=2, num_workers=1, persistent_workers=True)
    iterator = iter(loader)
    assert next(iterator).tolist() == [0, 1]
    workers = list(loader._iterator._workers)
    gone = weakref.ref(loader)
    gc.disable()  # only reference counting may free it
    try:
        del loader, iterator
        assert gone() is None
    finally:
        gc.enable()
    for worker in workers:
        worker.join(timeout=2)
    assert not any(worker.is_alive() for worker in workers)


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"step": torch.tensor(1)}, target)
    before = target.read_bytes()

    def half_write_then_fail(obj, stream):
        stream.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": torch.tensor(2)}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    atomic_torch_save({"step": torch.tensor(3)}, target)
    assert int(torch.load(target, weights_only=True)["step"]) == 3


def test_trainer_writes_checkpoints_through_the_atomic_writer(tmp_path):
    job = Job(validated(compose_config(*SMALL)), tmp_path)
    assert type(job.trainer.strategy.checkpoint_io) is AtomicCheckpointIO


def test_guard_decides_with_the_other_processes():
    """Under DDP one process's NaN poisons everyone's all-reduced gradients: all stop, or all skip."""
    other_process_bad = SimpleNamespace(reduce_boolean_decision=lambda local_bad, all: True)
    trainer = SimpleNamespace(
        strategy=other_process_bad,
        global_step=7,
        current_epoch=1,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=3)),
    )
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    optimizer = torch.optim.AdamW(layer.parameters())
    stop = NonFiniteLossGuard("stop")
    stop.on_before_backward(trainer, None, torch.tensor(0.5))  # finite here
    with pytest.raises(
        NonFiniteLossError, match=r"loss is non-finite on another process at global step 7 \(epoch 1, batch 3\)"
    ):
        stop.on_before_optimizer_step(trainer, None, optimizer)
    skip = NonFiniteLossGuard("skip")
    skip.on_before_backward(trainer, None, torch.tensor(0.5))
    with pytest.warns(UserWarning, match="skipped the optimizer step at global step 7"):
        skip.on_before_optimizer_step(trainer, None, optimizer)
    assert all(p.grad is None for p in layer.parameters()) and skip.skipped_steps == 1


def poison_loss_at(monkeypatch, bad_batch: int) -> None:
    original = DetrModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if batch_idx == bad_batch else loss

    monkeypatch.setattr(DetrModule, "training_step", training_step)


def test_nan_loss_stops_the_run_naming_the_step_before_the_weights_change(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, bad_batch=1)
    job = Job(validated(compose_config(*SMALL)), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at global step 1 \(epoch 0, batch 1\)"):
        job.run()
    assert job.trainer.global_step == 1
    assert all(torch.isfinite(p).all() for p in job.module.parameters())
    assert {int(state["step"]) for state in job.trainer.optimizers[0].state.values()} == {1}


@pytest.mark.slow
def test_a_bad_micro_batch_spoils_its_accumulated_step(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, bad_batch=0)  # the first of the two batches accumulated into step 0
    job = Job(validated(compose_config(*SMALL, "trainer.accumulate_grad_batches=2")), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at global step 0 \(epoch 0, batch 1\)"):
        job.run()
    assert all(torch.isfinite(p).all() for p in job.module.parameters())


@pytest.mark.slow
def test_nan_loss_step_is_skipped_when_asked(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, bad_batch=1)
    job = Job(validated(compose_config(*SMALL, "callbacks.non_finite_loss=skip")), tmp_path)
    with pytest.warns(UserWarning, match=r"skipped the optimizer step at global step 1 \(epoch 0, batch 1\)"):
        job.run()
    guard = next(c for c in job.trainer.callbacks if isinstance(c, NonFiniteLossGuard))
    assert guard.skipped_steps == 1 and job.trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in job.module.parameters())
    # AdamW moved every parameter on the three good steps only: the skipped one left moments and counts alone
    assert {int(state["step"]) for state in job.trainer.optimizers[0].state.values()} == {3}


def test_bad_non_finite_action_is_rejected():
    with pytest.raises(ValueError, match="callbacks.non_finite_loss='ignore' is not one of stop, skip"):
        validated(compose_config(*SMALL, "callbacks.non_finite_loss=ignore"))
