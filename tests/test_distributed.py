"""Several processes: DDP on the CPU with gloo, the SLURM launcher config, submitit's local launcher."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from detr_backbone.data import build_datamodule
from detr_backbone.training.job import validated
from detr_backbone.training.module import DetrModule

from .jobs import ROOT, SMALL, compose_config

# One 40x40 image per batch: what is computed per image does not depend on how the images are
# split between processes and batches.
ONE_PER_BATCH = (*SMALL, "data.min_size=40", "data.max_size=40", "data.val_size=4", "data.batch_size=1")


def run_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=420,
    )


def last_logged(metrics_csv: Path, key: str) -> float:
    with metrics_csv.open() as stream:
        return [float(row[key]) for row in csv.DictReader(stream) if row[key]][-1]


# The DDP run of train.py, shared with test_visual.py (the ddp_run fixture of conftest.py): two epochs, with the
# prediction grid and the part summary that test_visual.py looks for.
DDP_RUN = (
    *ONE_PER_BATCH,
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "callbacks.predictions.enabled=true",
    "callbacks.parameter_summary=true",
)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_syncs_metrics_and_checkpoints_for_one_process(ddp_run):
    assert ddp_run.result.returncode == 0, ddp_run.result.stderr[-3000:]
    run = ddp_run.dir
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # 8 images over 2 processes, one per batch: 4 steps an epoch, not the 8 of one process; two epochs
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (8, 1)

    # The checkpoint loads in a single process, and validating it there on the whole validation set
    # gives what the two processes logged, each having seen half of it: the logged cross-entropy is
    # reduced across processes, the mAP's states are gathered before it is computed.
    cfg = validated(compose_config(*ONE_PER_BATCH, "trainer.accelerator=cpu"))
    module = DetrModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    single = trainer.validate(module, datamodule=build_datamodule(cfg.data), verbose=False)[0]
    for key in ("val/loss_ce", "val/map", "val/map_50"):
        assert single[key] == pytest.approx(last_logged(run / "csv" / "metrics.csv", key), rel=1e-5, abs=1e-7), key


def test_slurm_launcher_config_asks_for_a_task_per_device_on_every_node(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit", reason="needs the slurm extra: pip install -e '.[slurm]'")
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=gpu",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")

    # The sbatch file submitit writes from these parameters, mapped the way the launcher maps them.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            key if key in base else f"slurm_{key}": value
            for key, value in params.items()
            if key not in ("_target_", "submitit_folder", "max_num_timeout")
        }
    )
    sbatch = executor._executor._make_submission_file_text("python train.py", "uid")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--time=1440",
        "--signal=USR2@120",
    ):
        assert f"#SBATCH {line}" in sbatch


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep_in_separate_processes(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra: pip install -e '.[slurm]'"
    )
    result = run_train(
        tmp_path,
        "-m",
        *SMALL,
        "data.train_size=4",
        "trainer.max_epochs=1",
        "position=sine,learned",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={tmp_path}/multirun",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "multirun"
    for job, target in (("0", "PositionEmbeddingSine"), ("1", "PositionEmbeddingLearned")):
        checkpoint = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["hyper_parameters"]["joiner"]["position"]["_target_"] == f"detr_backbone.{target}"
        assert checkpoint["global_step"] == 2
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # one submitit process per job
