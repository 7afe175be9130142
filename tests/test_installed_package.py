"""The package as a user installs it: the wheel built from this checkout, installed into a fresh virtual
environment outside it, and its ``detr-backbone`` script run from an empty folder with a config folder of
the user's own: train, resume by checkpoint alone, predict, evaluate and export.

The fresh environment takes the dependencies from the test environment (a ``.pth`` file naming its
site-packages) and installs the wheel alone, with ``--no-deps``: what is tested is the wheel (its
configs, its entry point, nothing read from the checkout), not pip's resolution of torch, which the
test environment's own installation has done already.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from .jobs import ROOT
from .test_train_command import SMALL_EXPERIMENT

pytestmark = pytest.mark.slow

BUILT_FROM = ("pyproject.toml", "README.md", "detr_backbone", "conf")  # what the wheel is built from
TWO_STEPS = ["trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1"]


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env={**environment, "HYDRA_FULL_ERROR": "0"}, timeout=timeout
    )


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    """The ``detr-backbone`` script of the wheel, installed into a fresh environment."""
    work = tmp_path_factory.mktemp("installed")
    source = work / "source"
    source.mkdir()
    for name in BUILT_FROM:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(source)], work)
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("detr_backbone-*.whl")
    environment = work / "env"
    venv.create(environment, with_pip=False)
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(environment)}))
    (site_packages / "test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = environment / "bin" / "python"
    installed = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], work
    )
    assert installed.returncode == 0, installed.stderr
    return environment / "bin" / "detr-backbone"


@pytest.fixture(scope="module")
def user_folder(script, tmp_path_factory) -> Path:
    """An empty folder with a config folder of the user's own (its experiment/small.yaml) and one photo."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_configs" / "experiment").mkdir(parents=True)
    (folder / "my_configs" / "experiment" / "small.yaml").write_text(SMALL_EXPERIMENT)
    Image.new("RGB", (60, 40), (200, 30, 30)).save(folder / "photo.png")
    return folder


@pytest.fixture(scope="module")
def trained_run(script, user_folder) -> Path:
    result = run([str(script), "train", "--config-dir", "my_configs", "experiment=small", *TWO_STEPS], user_folder)
    assert result.returncode == 0, result.stderr
    (run_folder,) = (user_folder / "outputs").glob("*/*")
    return run_folder


def test_the_wheel_holds_the_configs_and_runs_from_outside_the_checkout(script, tmp_path):
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(script.parents[1])}))
    packaged = site_packages / "detr_backbone" / "conf"
    assert sorted(path.relative_to(packaged) for path in packaged.rglob("*.yaml")) == sorted(
        path.relative_to(ROOT / "conf") for path in (ROOT / "conf").rglob("*.yaml")
    )
    assert (packaged / "config.yaml").read_text() == (ROOT / "conf" / "config.yaml").read_text()
    installed = site_packages / "detr_backbone"
    modules = sorted(p.relative_to(ROOT) for p in (ROOT / "detr_backbone").rglob("*.py"))
    assert sorted(p.relative_to(site_packages) for p in installed.rglob("*.py") if "conf" not in p.parts) == modules
    shown = run([str(script), "predict", "--help"], tmp_path)
    assert shown.returncode == 0 and "threshold: 0.5" in shown.stdout
    unknown = run([str(script), "fit"], tmp_path)
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines()[0] == (
        "error: unknown command 'fit'; valid: train, predict, evaluate, export, render, verify"
    )
    assert not list(tmp_path.iterdir())


def test_train_from_a_users_config_folder(trained_run):
    config = yaml.safe_load((trained_run / ".hydra" / "config.yaml").read_text())
    assert config["backbone"]["name"] == "resnet18" and config["hidden_dim"] == 32  # the user's file, by name
    assert (config["data"]["train_size"], config["trainer"]["max_steps"]) == (8, 2)
    assert (trained_run / "train.log").is_file()  # the job is named train, as with train.py
    saved = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["overrides"] == ["experiment=small", *TWO_STEPS] and saved["global_step"] == 2
    assert saved["config_dir"] == str(trained_run.parents[2] / "my_configs")


def test_predict_evaluate_and_export_the_runs_checkpoint(script, trained_run, user_folder, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    predicted = run(
        [str(script), "predict", f"ckpt_path={checkpoint}", "input=photo.png", f"output_dir={tmp_path / 'p'}"],
        user_folder,
    )
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads((tmp_path / "p" / "detections.json").read_text()) is not None
    assert (tmp_path / "p" / "photo.png").is_file()
    evaluated = run([str(script), "evaluate", f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'e'}"], user_folder)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "on the data=shapes validation set (the run's own): 2 images" in evaluated.stdout
    output = tmp_path / "model.onnx"
    exported = run(
        [str(script), "export", f"ckpt_path={checkpoint}", f"output={output}", "trace_size=[64,80]",
         "check_size=[64,64]"], user_folder,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert output.stat().st_size > 0


def test_a_resume_by_checkpoint_alone_continues_the_run_in_its_own_folder(script, trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    configs = trained_run.parents[2] / "my_configs"
    refused = run([str(script), "train", f"ckpt_path={checkpoint}", "model=deformable_detr_small"], tmp_path)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: ckpt_path='{checkpoint}' was trained with another config (model._target_: ")
    )
    assert "model=deformable_detr_small" not in (trained_run / ".hydra" / "overrides.yaml").read_text()
    assert not list(tmp_path.iterdir())  # a refused resume writes nothing, there or here

    more = ["trainer.max_steps=3", "trainer.max_epochs=2"]  # a fit stopped by max_steps has ended its epoch
    resumed = run([str(script), "train", f"ckpt_path={checkpoint}", *more], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"resuming {checkpoint} in {trained_run} with its run's overrides: experiment=small "
        f"callbacks.checkpoint.every_n_train_steps=1 and configs from {configs}\n"
    ) in resumed.stderr
    assert not list(tmp_path.iterdir())  # no new run folder
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3
    assert yaml.safe_load((trained_run / ".hydra" / "overrides.yaml").read_text()) == [
        f"ckpt_path={checkpoint}",
        *more,
        "experiment=small",
        "callbacks.checkpoint.every_n_train_steps=1",
    ]  # hydra.run.dir is Hydra's own override, not the task's
