"""The train command: ``detr-backbone train`` (``python -m detr_backbone train``), a resume by its checkpoint
alone, a user's own config folder, and evaluate scoring a checkpoint on its run's own data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from detr_backbone.commands.cli import compose_command
from detr_backbone.commands.evaluate import EvaluateConfig
from detr_backbone.commands.evaluate import main as evaluate_main
from detr_backbone.commands.predict import main as predict_main
from detr_backbone.commands.train import main as train_main
from detr_backbone.training.callbacks.saved_config import CommandLine
from detr_backbone.training.resume import resume_command_line

from .jobs import SMALL


def experiment_file(overrides: list[str]) -> str:
    """Command-line overrides as an experiment file of a user's own: groups chosen in its defaults list."""
    groups = [override for override in overrides if override.startswith(("backbone=", "model="))]
    defaults = [{f"override /{key}": value} for key, value in (group.split("=", 1) for group in groups)]
    values = OmegaConf.to_container(OmegaConf.from_dotlist([o for o in overrides if o not in groups]))
    return "# @package _global_\n" + yaml.safe_dump({"defaults": defaults, **values}, sort_keys=False)


SMALL_EXPERIMENT = experiment_file(SMALL)  # the SMALL job, selected by name from --config-dir
TWO_STEPS = ["trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1"]


def detr_backbone(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m detr_backbone <arguments>`` in ``cwd``, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "detr_backbone", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        timeout=300,
    )


def user_configs(folder: Path) -> Path:
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "small.yaml").write_text(SMALL_EXPERIMENT)
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """Two steps of the SMALL job from a user's config folder, in the default run folder under outputs/."""
    cwd = tmp_path_factory.mktemp("user")
    configs = user_configs(cwd / "my_configs")
    result = detr_backbone("train", "--config-dir", str(configs), "experiment=small", *TWO_STEPS, cwd=cwd)
    assert result.returncode == 0, result.stderr
    (run,) = (cwd / "outputs").glob("*/*")
    return run


def test_train_runs_a_users_experiment_and_saves_its_overrides(trained_run):
    config = yaml.safe_load((trained_run / ".hydra" / "config.yaml").read_text())
    assert config["backbone"]["name"] == "resnet18" and config["hidden_dim"] == 32  # the user's file, by name
    assert config["data"]["train_size"] == 8 and config["trainer"]["max_steps"] == 2
    assert (trained_run / "train.log").is_file()  # the job is named train, as with train.py
    saved = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["overrides"] == ["experiment=small", *TWO_STEPS]
    assert saved["global_step"] == 2


def test_a_resume_by_checkpoint_alone_continues_the_run_in_its_own_folder(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    configs = trained_run.parents[2] / "my_configs"
    assert torch.load(checkpoint, weights_only=True)["config_dir"] == str(configs)
    refused = detr_backbone("train", f"ckpt_path={checkpoint}", "model=deformable_detr_small", cwd=tmp_path)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: ckpt_path='{checkpoint}' was trained with another config (model._target_: ")
    )
    overrides = (trained_run / ".hydra" / "overrides.yaml").read_text()
    assert "model=deformable_detr_small" not in overrides  # a refused resume leaves the run's folder as it was
    assert not (tmp_path / "outputs").exists()

    # a fit stopped by max_steps has ended its epoch: the next step is in epoch 2
    more = ["trainer.max_steps=3", "trainer.max_epochs=2"]
    resumed = detr_backbone("train", f"ckpt_path={checkpoint}", *more, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"resuming {checkpoint} in {trained_run} with its run's overrides: experiment=small "
        f"callbacks.checkpoint.every_n_train_steps=1 and configs from {configs}\n"
    ) in resumed.stderr
    assert not (tmp_path / "outputs").exists()  # no new run folder
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3
    assert yaml.safe_load((trained_run / ".hydra" / "overrides.yaml").read_text()) == [
        f"ckpt_path={checkpoint}",
        *more,
        "experiment=small",
        "callbacks.checkpoint.every_n_train_steps=1",
    ]  # hydra.run.dir is Hydra's own override, not the task's


def fake_run(folder: Path, command_line: CommandLine | None, hydra_overrides: list[str] | None = None) -> Path:
    """A run folder whose last.ckpt holds ``command_line`` (None: written before checkpoints kept one)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / ".hydra").mkdir()
    if hydra_overrides is not None:
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(hydra_overrides))
    content = {"state_dict": {}}
    if command_line is not None:
        content.update(overrides=list(command_line.overrides), config_dir=command_line.config_dir)
    torch.save(content, folder / "checkpoints" / "last.ckpt")
    return folder / "checkpoints" / "last.ckpt"


def test_a_resume_command_line_adds_the_runs_overrides_where_none_is_given(tmp_path, capsys):
    run = tmp_path / "my run"
    saved = ("model=detr_small", "hidden_dim=32", "init_from=detr.pth", "trainer.max_epochs=3")
    checkpoint = fake_run(run, CommandLine(saved, "/my/configs"))
    given = CommandLine((f"ckpt_path={checkpoint}", "trainer.max_epochs=5", "--cfg", "job"))
    assert resume_command_line(given) == CommandLine(
        (
            f"ckpt_path={checkpoint}",
            "trainer.max_epochs=5",  # given now: it wins over the saved 3
            "--cfg",
            "job",
            "model=detr_small",
            "hidden_dim=32",  # init_from is not repeated: the weights come from the checkpoint
            f"hydra.run.dir='{run}'",  # quoted: the folder's name has a space
        ),
        "/my/configs",
    )
    assert capsys.readouterr().err == (
        f"resuming {checkpoint} in {run} with its run's overrides: model=detr_small hidden_dim=32 "
        "and configs from /my/configs\n"
    )
    given = CommandLine((f"ckpt_path={checkpoint}", "hydra.run.dir=elsewhere"), "/other/configs")
    assert resume_command_line(given) == CommandLine(
        (*given.overrides, "model=detr_small", "hidden_dim=32", "trainer.max_epochs=3"), "/other/configs"
    )


def test_a_resume_command_line_leaves_sweeps_last_and_unknown_checkpoints_alone(tmp_path):
    old = fake_run(tmp_path / "old", None, hydra_overrides=["backbone=resnet50"])
    assert resume_command_line(CommandLine((f"ckpt_path={old}",))).overrides[1:] == (
        "backbone=resnet50",
        f"hydra.run.dir={tmp_path / 'old'}",
    )
    bare = fake_run(tmp_path / "bare", None)
    for overrides in (
        ("-m", f"ckpt_path={old}"),
        ("ckpt_path=last",),
        (f"ckpt_path={tmp_path / 'missing.ckpt'}",),
        (f"ckpt_path={bare}",),  # no command line saved anywhere: as given
        ("trainer.max_epochs=2",),
    ):
        assert resume_command_line(CommandLine(overrides)) == CommandLine(overrides)


def test_every_command_finds_a_users_configs_and_names_a_missing_folder(tmp_path, capsys):
    (tmp_path / "mine" / "data").mkdir(parents=True)
    (tmp_path / "mine" / "data" / "tiny_shapes.yaml").write_text("defaults:\n  - shapes\n  - _self_\nval_size: 3\n")
    cfg = compose_command(
        "evaluate", EvaluateConfig, ["--config-dir", str(tmp_path / "mine"), "data=tiny_shapes", "ckpt_path=x"]
    )
    package = compose_command("evaluate", EvaluateConfig, [f"--config-dir={tmp_path / 'mine'}", "ckpt_path=x"])
    assert package.data.val_size == 200  # the package's own data: shapes
    assert (cfg.data.kind, cfg.data.val_size, cfg.data.min_size) == ("shapes", 3, package.data.min_size)
    with pytest.raises(SystemExit) as stopped:
        predict_main(["--config-dir", str(tmp_path / "nowhere"), "ckpt_path=x", "input=y"])
    assert stopped.value.code == (
        f"error: --config-dir {tmp_path / 'nowhere'}: no such folder ({tmp_path / 'nowhere'}); give a folder that "
        "holds your own config groups, e.g. experiment/, data/, backbone/"
    )
    with pytest.raises(SystemExit) as stopped:
        train_main(["--config-dir", str(tmp_path / "nowhere"), "trainer.max_steps=1"])
    assert stopped.value.code.startswith(f"error: --config-dir {tmp_path / 'nowhere'}: no such folder")


def test_evaluate_scores_a_checkpoint_on_its_runs_own_validation_set(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    metrics = evaluate_main([f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'own'}", "progress=false"])
    assert metrics.images == 2  # the run's data.val_size, not the 200 of the package's shapes config
    saved = json.loads((tmp_path / "own" / "metrics.json").read_text())["data"]
    assert (saved["val_size"], saved["min_size"], saved["max_size"]) == (2, 32, 48)
    assert f"{checkpoint} on the data=shapes validation set (the run's own): 2 images" in capsys.readouterr().out
    metrics = evaluate_main(
        [f"ckpt_path={checkpoint}", "data.val_size=3", "data.min_size=40", f"output_dir={tmp_path / 'given'}"]
    )
    assert metrics.images == 3  # data overrides choose the data
