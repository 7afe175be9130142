"""conf/debug/: each preset composes to the Trainer settings it documents, and does that to the job."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from detr_backbone.training.job import Job, validated

from .jobs import ROOT, SMALL, compose_config

# The small job, its epoch count left to the preset.
JOB = [o for o in SMALL if not o.startswith("trainer.max_epochs")]

PRESET_TRAINER_KEYS = {
    "default": {"max_epochs": 1, "devices": 1, "detect_anomaly": True},
    "fdr": {"fast_dev_run": True},
    "overfit": {"overfit_batches": 3, "max_epochs": 100, "detect_anomaly": False},
    "limit": {"max_epochs": 3, "limit_train_batches": 5, "limit_val_batches": 2, "limit_test_batches": 2},
    "profiler": {"profiler": "simple", "max_epochs": 1, "detect_anomaly": False},
}


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


class BatchRecorder(pl.Callback):
    """The image ids of every batch each loop ran, by epoch for fitting, and the training losses."""

    def __init__(self):
        self.train: dict[int, list[list[int]]] = defaultdict(list)
        self.val: dict[int, list[list[int]]] = defaultdict(list)
        self.test: list[list[int]] = []
        self.losses: dict[int, list[float]] = defaultdict(list)

    @staticmethod
    def image_ids(batch) -> list[int]:
        return [int(target["image_id"]) for target in batch[1]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train[trainer.current_epoch].append(self.image_ids(batch))
        self.losses[trainer.current_epoch].append(float(outputs["loss"]))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val[trainer.current_epoch].append(self.image_ids(batch))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test.append(self.image_ids(batch))


def run_preset(run_dir: Path, preset: str, *overrides: str) -> tuple[Job, BatchRecorder, float | None]:
    job = Job(validated(compose_config(*JOB, f"debug={preset}", *overrides)), run_dir)
    recorder = BatchRecorder()
    job.trainer.callbacks.append(recorder)
    return job, recorder, job.run()


def test_every_preset_is_covered():
    assert sorted(p.stem for p in (ROOT / "conf" / "debug").glob("*.yaml")) == sorted(PRESET_TRAINER_KEYS)


@pytest.mark.parametrize("preset", PRESET_TRAINER_KEYS)
def test_preset_sets_its_trainer_keys_a_debug_folder_and_debug_logs(preset):
    cfg = compose_with_hydra(f"debug={preset}")
    assert {key: cfg.trainer[key] for key in PRESET_TRAINER_KEYS[preset]} == PRESET_TRAINER_KEYS[preset]
    assert cfg.data.num_workers == 0
    assert cfg.hydra.run.dir.startswith("outputs/debug/") and cfg.hydra.sweep.dir.startswith("multirun/debug/")
    assert cfg.hydra.job_logging.root.level == "DEBUG"
    assert cfg.hydra.job_logging.loggers.pytorch_lightning.level == "DEBUG"
    OmegaConf.resolve(cfg)
    del cfg.hydra
    validated(cfg)


def test_presets_override_the_knobs_of_the_primary_config_and_the_command_line_overrides_them():
    assert compose_config("debug=overfit").test_after_fit is False  # config.yaml says true
    assert compose_config("debug=overfit", "test_after_fit=true").test_after_fit is True
    cfg = compose_config("experiment=detr_r50_coco")
    assert (cfg.hidden_dim, cfg.lr, cfg.lr_backbone) == (256, 1e-4, 1e-5)


@pytest.mark.slow
def test_fdr_runs_one_batch_of_each_loop_and_writes_no_checkpoint(tmp_path):
    job, batches, value = run_preset(tmp_path, "fdr", "test_after_fit=true")
    assert job.trainer.global_step == 1
    assert (len(batches.train[0]), len(batches.val[0]), len(batches.test)) == (1, 1, 1)
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "csv").exists()
    assert value is None  # nothing was scored


@pytest.mark.slow
def test_overfit_trains_on_the_same_first_batches_every_epoch_and_learns_them(tmp_path):
    # 8 training images in batches of 2: 4 batches, of which overfit_batches=3 are used
    _job, batches, _ = run_preset(tmp_path, "overfit", "trainer.max_epochs=8")
    first_three = [[0, 1], [2, 3], [4, 5]]
    assert all(batches.train[epoch] == first_three for epoch in range(8))
    assert all(batches.val[epoch] == [[0, 1]] for epoch in range(8))  # the 2 validation images: one batch
    mean_loss = [sum(losses) / len(losses) for losses in batches.losses.values()]
    assert mean_loss[-1] < 0.9 * mean_loss[0]
    assert batches.test == []  # test_after_fit=false


@pytest.mark.slow
def test_limit_runs_the_set_number_of_batches_per_epoch(tmp_path):
    # 12 training and 6 validation images in batches of 2: 6 and 3 batches, cut to 5 and 2; without
    # anomaly detection, which would double the time of the test's fifteen steps
    overrides = ("data.train_size=12", "data.val_size=6", "test_after_fit=true", "trainer.detect_anomaly=false")
    job, batches, value = run_preset(tmp_path, "limit", *overrides)
    assert [len(batches.train[epoch]) for epoch in range(3)] == [5, 5, 5] and job.trainer.global_step == 15
    assert [len(batches.val[epoch]) for epoch in range(3)] == [2, 2, 2]
    assert len(batches.test) == 2
    assert batches.train[0] != batches.train[1]  # still shuffled, unlike overfit
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and value is not None


@pytest.mark.parametrize("profiler, expected", [("simple", "run_training_epoch"), ("advanced", "ncalls")])
@pytest.mark.slow
def test_profiler_writes_its_report_into_the_run_folder(tmp_path, profiler, expected):
    run_preset(tmp_path, "profiler", f"trainer.profiler={profiler}", "data.train_size=4", "test_after_fit=true")
    fit_report = (tmp_path / "fit-profiler.txt").read_text()
    assert expected in fit_report and "training_step" in fit_report
    assert "test_step" in (tmp_path / "test-profiler.txt").read_text()


@pytest.mark.slow
def test_train_py_with_a_preset_writes_under_outputs_debug_with_lightning_debug_logs(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *JOB, "debug=fdr"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = (tmp_path / "outputs" / "debug").glob("*/*")  # <date>/<time>
    log = (run / "train.log").read_text()
    assert "[pytorch_lightning.trainer.trainer][DEBUG]" in log and "fast_dev_run" in log
    assert not list(run.rglob("*.ckpt"))
