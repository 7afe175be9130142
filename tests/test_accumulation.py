"""trainer.accumulate_grad_batches: what a step's gradient is with it, and DDP with it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from detr_backbone.training.job import Job, validated

from .jobs import ROOT, SMALL, compose_config

# Two 40x40 images, one optimizer step: no padding differs between a batch of two and two batches of one
TWO_IMAGES = (*SMALL, "data.min_size=40", "data.max_size=40", "data.train_size=2", "trainer.max_steps=1")


class StepGradients(pl.Callback):
    """The gradients the optimizer steps with (before clipping), and the parameters after the step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.gradients = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, pl_module) -> None:
        self.parameters = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def step(folder: Path, *overrides: str) -> tuple[StepGradients, Job]:
    job = Job(validated(compose_config(*TWO_IMAGES, *overrides)), folder)
    recorder = StepGradients()
    job.trainer.callbacks.append(recorder)
    job.run()
    assert job.trainer.global_step == 1
    return recorder, job


def assert_all_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol)


@pytest.mark.slow
def test_two_accumulated_batches_of_one_equal_one_batch_of_two_with_a_box_each(tmp_path, one_thread):
    # one box an image: DETR's loss normalised by a batch's boxes is then the mean over its images
    whole, _ = step(tmp_path / "whole", "data.max_objects=1", "data.batch_size=2")
    accumulated, _ = step(
        tmp_path / "acc", "data.max_objects=1", "data.batch_size=1", "trainer.accumulate_grad_batches=2"
    )
    assert_all_close(accumulated.gradients, whole.gradients, atol=1e-6)  # float rounding: 1.5e-7 measured
    # AdamW's first step is about lr * sign(gradient) (lr 2e-4): rounding moves gradients near its eps (1e-8)
    assert_all_close(accumulated.parameters, whole.parameters, atol=1e-6)
    with (tmp_path / "acc" / "csv" / "metrics.csv").open() as stream:
        logged_steps = [int(row["step"]) for row in csv.DictReader(stream) if row["train/loss"]]
    assert logged_steps == [0]  # one row per optimizer step, not one per batch


class CrashAt(pl.Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            raise RuntimeError("crash")


@pytest.mark.slow
def test_a_checkpoint_every_step_resumes_where_the_accumulation_left_off(tmp_path, one_thread):
    # 8 images in batches of 2, two batches a step: 2 steps an epoch; last.ckpt after every step
    common = (*SMALL, "trainer.accumulate_grad_batches=2", "callbacks.checkpoint.every_n_train_steps=1")
    straight = Job(validated(compose_config(*common)), tmp_path / "straight")
    straight.run()
    crashed = Job(validated(compose_config(*common)), tmp_path / "crashed")
    crashed.trainer.callbacks.append(CrashAt(3))  # after one step and one batch accumulated into the next
    with pytest.raises(RuntimeError, match="crash"):
        crashed.run()
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 1
    batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"]
    assert batches == 2  # written after the batch that stepped, not between the two accumulated ones
    resumed = Job(validated(compose_config(*common, f"ckpt_path={last}")), tmp_path / "resumed")
    resumed.run()
    assert (resumed.trainer.global_step, straight.trainer.global_step) == (2, 2)
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step in a plain loop
@pytest.mark.slow
def test_accumulation_is_the_mean_of_each_batchs_own_normalised_gradient(tmp_path, one_thread):
    # images of 1..3 boxes: each micro-batch is normalised by its own box count, then the steps are averaged
    accumulated, _ = step(
        tmp_path / "acc", "data.max_objects=3", "data.batch_size=1", "trainer.accumulate_grad_batches=2"
    )
    fresh = Job(validated(compose_config(*TWO_IMAGES, "data.max_objects=3", "data.batch_size=1")), tmp_path / "plain")
    module, datamodule = fresh.module, fresh.datamodule
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    boxes = [len(targets[0]["boxes"]) for _, targets in batches]
    assert len(batches) == 2 and boxes[0] != boxes[1]  # seed 42 draws unequal counts: the case that differs
    for index, batch in enumerate(batches):
        (module.training_step(batch, index) / 2).backward()
    expected = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert_all_close(accumulated.gradients, expected, atol=1e-6)
    # the batch of two, normalised by its total box count, is another gradient
    whole, _ = step(tmp_path / "whole", "data.max_objects=3", "data.batch_size=2")
    name = "detector.bbox_embed.layers.2.weight"
    assert not torch.allclose(whole.gradients[name], expected[name], rtol=1e-3)


@pytest.mark.slow
def test_ddp_with_accumulation_completes_and_ranks_hold_equal_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "tests.ddp_weights", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    # 8 images, one a batch, over 2 processes: 4 batches each, 2 optimizer steps of 2 accumulated batches
    assert [state["global_step"] for state in ranks] == [2, 2]
    weights = [state["weights"] for state in ranks]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    initial = ranks[0]["initial"]
    assert any(not torch.equal(initial[name], weights[0][name]) for name in initial)  # it trained


@pytest.mark.parametrize("value", [0, -2])
def test_bad_accumulation_names_the_key(value):
    with pytest.raises(ValueError, match=f"trainer.accumulate_grad_batches={value} must be >= 1"):
        validated(compose_config(*SMALL, f"trainer.accumulate_grad_batches={value}"))
