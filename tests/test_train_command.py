"""What the commands settle before composing: a resume by checkpoint alone (the run's saved command line)
and a user's own config folder. The installed ``detr-backbone`` script runs them end to end in
test_installed_package.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from detr_backbone.commands.cli import compose_command
from detr_backbone.commands.evaluate import EvaluateConfig
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
