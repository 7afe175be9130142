"""callbacks.ema: the warm-up arithmetic by hand, and a training job whose validation, checkpoints and resume
carry the average."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from detr_backbone.data import build_datamodule
from detr_backbone.inference.checkpoint import load_detector
from detr_backbone.training.callbacks.ema import TRAINING_WEIGHTS_KEY, WarmedUpEma
from detr_backbone.training.job import Job, validated
from detr_backbone.training.module import DetrModule

from .jobs import SMALL, compose_config


def test_the_average_follows_the_warm_up_formula_by_hand():
    decay, warmup = 0.9, 2.0
    model = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    model[0].bias.requires_grad_(False)  # frozen: the average of a constant is that constant, exactly
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.3)
    ema = WarmedUpEma(model, decay, int(warmup))
    weight, running_mean = 1.0, 0.0  # the average's values, computed by hand
    for update, (new_weight, batch_mean) in enumerate([(3.0, 2.0), (-1.0, 4.0), (5.0, -2.0)], start=1):
        with torch.no_grad():
            model[0].weight.fill_(new_weight)
        model.train()(torch.full((4, 1), (batch_mean - 0.3) / new_weight))  # BatchNorm sees a batch of mean batch_mean
        model_mean = float(model[1].running_mean)
        ema.update(model, step=update)
        d = decay * (1 - math.exp(-update / warmup))
        weight = d * weight + (1 - d) * new_weight
        running_mean = d * running_mean + (1 - d) * model_mean
        assert float(ema.module[0].weight) == pytest.approx(weight, rel=1e-6)
        assert float(ema.module[1].running_mean) == pytest.approx(running_mean, rel=1e-6)
    assert ema.module[0].bias.item() == torch.tensor(0.3).item()
    assert int(ema.module[1].num_batches_tracked) == 3  # integers are copied, not averaged
    assert ema.get_decay(10**6) == pytest.approx(decay)
    assert WarmedUpEma(model, decay, 0).get_decay(1) == decay  # no warm-up


EMA = (
    *SMALL,
    "callbacks.ema.enabled=true",
    "callbacks.ema.decay=0.8",
    "callbacks.ema.warmup_steps=2",
    "lr=1e-3",
    "lr_backbone=1e-3",
    "trainer.num_sanity_val_steps=0",
    "backbone.trainable_layers=4",  # the stem frozen
)


def run(folder: Path, *overrides: str) -> Job:
    job = Job(validated(compose_config(*EMA, *overrides)), folder)
    job.run()
    return job


def last_logged(folder: Path, key: str) -> float:
    with (folder / "csv" / "metrics.csv").open() as stream:
        return [float(row[key]) for row in csv.DictReader(stream) if row.get(key)][-1]


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_validation_checkpoints_and_resume_carry_the_average(tmp_path, one_thread):
    straight = run(tmp_path / "straight", "trainer.max_epochs=2")
    run(tmp_path / "first", "trainer.max_epochs=1")
    first_last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = run(tmp_path / "resumed", "trainer.max_epochs=2", f"ckpt_path={first_last}")
    assert straight.trainer.global_step == resumed.trainer.global_step == 8

    # a resume from step 4 to 8 ends where the uninterrupted run does: the average and the trained weights
    ends = [
        torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
        for folder in (straight.run_dir, resumed.run_dir)
    ]
    assert_states_equal(ends[0]["state_dict"], ends[1]["state_dict"])
    assert_states_equal(ends[0][TRAINING_WEIGHTS_KEY], ends[1][TRAINING_WEIGHTS_KEY])
    assert ends[0]["callbacks"]["EmaWeights"] == {"updates": 8}
    averaged, trained = ends[0]["state_dict"], ends[0][TRAINING_WEIGHTS_KEY]
    moved = [name for name in trained if not torch.equal(averaged[name], trained[name])]
    assert "detector.class_embed.weight" in moved  # two different sets of weights
    stem = "detector.backbone.0.body.conv1.weight"  # frozen: its average is itself
    assert torch.equal(averaged[stem], trained[stem])

    # validation ran the average: validating the checkpoint's state_dict alone gives the logged numbers
    best = torch.load(straight.checkpoint.best_model_path, weights_only=True)
    assert TRAINING_WEIGHTS_KEY in best
    module = DetrModule.load_from_checkpoint(straight.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    datamodule = build_datamodule(straight.cfg.data)
    logged = last_logged(straight.run_dir, "val/loss")
    assert trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"] == pytest.approx(logged)
    module.load_state_dict(trained)
    assert trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"] != pytest.approx(logged)

    # predict, evaluate and export read the average
    detector = load_detector(straight.run_dir / "checkpoints" / "last.ckpt").detector
    assert torch.equal(detector.class_embed.weight, averaged["detector.class_embed.weight"])
    # and the module in memory after fitting holds it too
    assert torch.equal(straight.module.detector.class_embed.weight, averaged["detector.class_embed.weight"])


def test_resuming_with_the_average_off_continues_from_the_trained_weights(tmp_path, one_thread):
    run(tmp_path / "first", "trainer.max_epochs=1")
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    # nothing left to train: the module holds what the resume restored
    with pytest.warns(UserWarning, match="resumes with it off"):
        job = run(tmp_path / "off", "trainer.max_epochs=1", "callbacks.ema.enabled=false", f"ckpt_path={checkpoint}")
    assert_states_equal(job.module.state_dict(), torch.load(checkpoint, weights_only=True)[TRAINING_WEIGHTS_KEY])


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match=r"callbacks.ema.decay=1.5 must be in \(0, 1\)"):
        validated(compose_config(*SMALL, "callbacks.ema.decay=1.5"))
    with pytest.raises(ValueError, match="callbacks.ema.warmup_steps=-1 must be >= 0"):
        validated(compose_config(*SMALL, "callbacks.ema.warmup_steps=-1"))
