"""optimizer.schedule: the lr of every step against torch's own schedulers and the formulas, and exact resumes."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR, StepLR

from detr_backbone.training.config import OptimConfig
from detr_backbone.training.job import Job, validated
from detr_backbone.training.schedule import RunSchedule, ScheduleConfig

from .jobs import SMALL, compose_config

LR = 1e-3


def optimizer() -> torch.optim.Optimizer:
    # two groups at different peaks: every group follows the same factor
    return torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr": LR / 10}], lr=LR)


def lrs(scheduler, steps: int) -> list[float]:
    """The first group's lr of each optimizer step."""
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def run_schedule(config: ScheduleConfig, lr_drop: int, total_steps: float, per_epoch: int) -> RunSchedule:
    scheduler = RunSchedule(optimizer(), config, lr_drop)
    scheduler.fit_to_run(total_steps, per_epoch)
    return scheduler


def ours(steps: int, per_epoch: int, lr_drop: int = 200, **schedule) -> list[float]:
    return lrs(run_schedule(ScheduleConfig(**schedule), lr_drop, steps, per_epoch), steps)


def test_step_drops_tenfold_every_lr_drop_epochs_as_an_epoch_wise_step_lr():
    reference = StepLR(optimizer(), step_size=2)
    expected = [lr for lr in lrs(reference, 7) for _ in range(5)]  # 5 steps an epoch
    assert ours(35, 5, lr_drop=2) == pytest.approx(expected, rel=1e-12)


def test_cosine_after_linear_warmup_is_torchs_linear_then_cosine_annealing():
    total, warmup = 60, 8
    opt = optimizer()
    reference = SequentialLR(
        opt,
        [
            LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1),
            CosineAnnealingLR(opt, T_max=total - warmup, eta_min=0.1 * LR),
        ],
        milestones=[warmup],
    )
    expected = lrs(reference, total)
    got = ours(total, 10, schedule="cosine", warmup_steps=warmup, min_lr_ratio=0.1)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got[0] == pytest.approx(LR / warmup) and got[warmup - 1] == pytest.approx(LR)


def test_flat_cosine_holds_the_peak_then_decays_to_its_floor_and_stays():
    total = 100
    got = ours(total, 10, schedule="flat_cosine", warmup_steps=4, min_lr_ratio=0.5, flat_fraction=0.5, decay_end=0.8)
    assert got[:4] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR])
    assert got[4:51] == pytest.approx([LR] * 47)  # flat through step 50
    # halfway between step 50 and step 80: 0.5 + 0.5 * (1 + cos(pi / 2)) / 2 of the peak
    assert got[65] == pytest.approx(0.75 * LR)
    assert got[70] == pytest.approx((0.5 + 0.25 * (1 + math.cos(math.pi * 20 / 30))) * LR)
    assert got[80:] == pytest.approx([0.5 * LR] * 20)


def test_deims_flat_cosine_at_chosen_steps():
    # DEIM-D-FINE-L's plan on a run of 580 steps (10 an epoch): a quadratic 20-step warm-up, the peak to epoch 29,
    # cosine to half the peak at epoch 50, that to the end (DEIM's flat_cosine_schedule, a step later: ours counts
    # optimizer steps from 1 in the warm-up)
    got = ours(
        580,
        10,
        schedule="flat_cosine",
        warmup_steps=20,
        warmup_power=2.0,
        min_lr_ratio=0.5,
        flat_fraction=29 / 58,
        decay_end=50 / 58,
    )
    assert got[4] == pytest.approx(LR * (5 / 20) ** 2) and got[9] == pytest.approx(LR / 4)
    assert got[19] == pytest.approx(LR) and got[290] == pytest.approx(LR)
    # epoch 40: (40 - 29) / (50 - 29) of the way down
    assert got[400] == pytest.approx(0.5 * LR + 0.5 * LR * 0.5 * (1 + math.cos(math.pi * 11 / 21)))
    assert got[500:] == pytest.approx([0.5 * LR] * 80)


def test_every_group_follows_the_factor_at_its_own_peak():
    scheduler = run_schedule(ScheduleConfig(schedule="cosine"), 200, 10, 10)
    for _ in range(5):
        scheduler.optimizer.step()
        scheduler.step()
    first, second = (group["lr"] for group in scheduler.optimizer.param_groups)
    assert second == pytest.approx(first / 10) and first == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi / 2)))


def test_a_step_lr_checkpoint_of_earlier_versions_resumes_at_its_epochs_steps():
    old = StepLR(optimizer(), step_size=2)
    lrs(old, 3)  # three epochs: the lr dropped once
    scheduler = RunSchedule(optimizer(), ScheduleConfig(), 2)
    scheduler.load_state_dict(old.state_dict())
    scheduler.fit_to_run(100, 5)
    assert scheduler.last_epoch == 15
    assert scheduler.get_lr()[0] == pytest.approx(LR / 10)
    assert lrs(scheduler, 6)[-1] == pytest.approx(LR / 100)  # epoch 4 starts at step 20


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"schedule": "linear"}, "optimizer.schedule='linear' is not one of step, cosine, flat_cosine"),
        ({"warmup_steps": -1}, "optimizer.warmup_steps=-1 must be >= 0"),
        ({"min_lr_ratio": 1.5}, "optimizer.min_lr_ratio=1.5 must be in [0, 1]"),
        ({"flat_fraction": 0.9, "decay_end": 0.8}, "optimizer.flat_fraction=0.9 and optimizer.decay_end=0.8"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_the_key(override, named):
    with pytest.raises(ValueError, match="^" + named.replace("[", r"\[").replace("]", r"\]")):
        OptimConfig(**override)


def test_a_run_without_an_end_cannot_decay():
    with pytest.raises(ValueError, match="optimizer.schedule=cosine needs the run's length"):
        run_schedule(ScheduleConfig(schedule="cosine"), 200, math.inf, 4)


class StepLrs(pl.Callback):
    """The head group's lr at each optimizer step, by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


# 8 images in batches of 2: 4 steps an epoch, 12 in the run; warm-up over 3 of them, then cosine to a tenth
COSINE = (
    *SMALL,
    "trainer.max_epochs=3",
    "optimizer.schedule=cosine",
    "optimizer.warmup_steps=3",
    "optimizer.min_lr_ratio=0.1",
    "callbacks.checkpoint.every_n_train_steps=1",
)


class CrashAtStep(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def run_job(folder, *overrides: str, crash_at: int | None = None) -> tuple[Job, StepLrs]:
    job = Job(validated(compose_config(*COSINE, *overrides)), folder)
    recorder = StepLrs()
    job.trainer.callbacks.append(recorder)
    if crash_at is None:
        job.run()
    else:
        job.trainer.callbacks.append(CrashAtStep(crash_at))
        with pytest.raises(RuntimeError, match="crash"):
            job.run()
    return job, recorder


def cosine_lr(step: int) -> float:
    """COSINE's lr at ``step`` (the tests' lr 2e-4), written out."""
    warmup = min(1, (step + 1) / 3)
    progress = min(1, max(0, step - 3) / 9)
    return 2e-4 * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.slow
def test_a_run_crashed_mid_warmup_or_mid_cosine_resumes_at_the_uninterrupted_lrs(tmp_path, one_thread):
    straight, straight_lrs = run_job(tmp_path / "straight")
    assert straight_lrs.lrs == pytest.approx({step: cosine_lr(step) for step in range(12)}, rel=1e-9)
    for crash in (1, 6):  # in the warm-up; in the cosine, mid-epoch 1
        folder = tmp_path / f"crashed_{crash}"
        run_job(folder, crash_at=crash)
        resumed, resumed_lrs = run_job(tmp_path / f"resumed_{crash}", f"ckpt_path={folder}/checkpoints/last.ckpt")
        assert resumed_lrs.lrs == {step: straight_lrs.lrs[step] for step in range(crash, 12)}
        for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("overrides", "epochs"),
    [
        (("min_train_steps=10",), 3),  # 8 images in batches of 2: 4 steps an epoch, 3 epochs hold 10 steps
        (("min_train_steps=2",), 1),  # trainer.max_epochs already holds them
        (("min_train_steps=10", "trainer.accumulate_grad_batches=2"), 5),  # 2 optimizer steps an epoch
    ],
)
def test_min_train_steps_gives_a_small_dataset_more_epochs(tmp_path, overrides, epochs):
    job = Job(validated(compose_config(*SMALL, *overrides)), tmp_path)
    assert job.trainer.max_epochs == epochs


def test_min_train_steps_must_be_positive():
    with pytest.raises(ValueError, match=r"^min_train_steps=0 must be > 0 optimizer steps"):
        validated(compose_config(*SMALL, "min_train_steps=0"))
