"""What a resume settles before anything is built: the command line (``ckpt_path=<file>`` alone brings
back the run's overrides and folder), which checkpoint (``ckpt_path=last``, a requeued SLURM job), and
whether the run's config fits the one the checkpoint was trained with.

Without the config check, another backbone or head fails deep inside Lightning's restore with
PyTorch's ``load_state_dict`` error and hundreds of key names, and a changed lr or seed would be
silently overridden by the checkpoint's optimizer state or break the data order.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..inference.checkpoint import mapped_checkpoint
from .callbacks.saved_config import CONFIG_DIR_KEY, CONFIG_KEY, OVERRIDES_KEY, CommandLine
from .checkpoint_io import check_resume_checkpoint
from .config import Config

LAST = "last"  # ckpt_path=last: the newest last.ckpt of the run folder
LAST_NAME = "last.ckpt"
SHOWN_KEYS = 8  # differing keys named in the message; the rest are counted

# Keys that may differ from the checkpoint's run: how long and on what hardware it trains, where the data
# lies and how it is loaded, what is logged and saved, and the knobs whose outputs match within float
# rounding. Everything else shapes the model, its optimizer or the data order, and must match.
MAY_CHANGE = (
    "ckpt_path",
    "init_from",
    "test_after_fit",
    "optimized_metric",
    "trainer.max_epochs",
    "min_train_steps",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.limit_*_batches",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.num_sanity_val_steps",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.profiler",
    "trainer.detect_anomaly",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "data.train_images",
    "data.train_annotations",
    "data.val_images",
    "data.val_annotations",
    "data.batch_size",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.cache",
    "data.size_divisibility",
    "data.bad_samples",
    "data.max_bad_fraction",
    "callbacks.*",
    "logger.*",
    "evaluation.*",
    "backbone.pretrained",
    "backbone.checkpoint",
    "backbone.strict",  # the weights come from the checkpoint
    "backbone.channels_last",
    "backbone.fold_frozen_bn",
    "backbone.compile",
    "model.compile",
)


# saved overrides a resume does not repeat: the weights come from the checkpoint, the folder from where it lies
NOT_RESUMED = ("init_from", "hydra.run.dir")
RUN_DIR = "hydra.run.dir"
MULTIRUN_FLAGS = ("-m", "--multirun")
PLAIN_VALUE = re.compile(r"[\w\-+./@%]+")  # characters a Hydra override value may hold unquoted


def may_change(key: str) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in MAY_CHANGE)


def override_key(argument: str, parser: OverridesParser) -> Optional[str]:
    """The key or config group a command-line override sets (``+backbone.width=16``: ``backbone.width``);
    None for Hydra's flags and their values."""
    if argument.startswith("-") or "=" not in argument:
        return None
    try:
        return parser.parse_override(argument).key_or_group
    except HydraException:
        return None  # Hydra reports it, with its own message, when it composes


def hydra_value(text: str) -> str:
    return text if PLAIN_VALUE.fullmatch(text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_folder(checkpoint: Path) -> Optional[Path]:
    """The run folder a checkpoint was written in (``<run>/checkpoints/<name>.ckpt``, ``<run>/.hydra/``), if it is one."""
    run = checkpoint.resolve().parent.parent
    return run if checkpoint.resolve().parent.name == "checkpoints" and (run / ".hydra").is_dir() else None


def saved_command_line(checkpoint: Path) -> Optional[CommandLine]:
    """What composed a run's config: saved in its checkpoints, else its folder's .hydra/overrides.yaml."""
    content = mapped_checkpoint(checkpoint)
    saved = content.get(OVERRIDES_KEY) if isinstance(content, Mapping) else None
    if isinstance(saved, list):
        return CommandLine(tuple(str(override) for override in saved), content.get(CONFIG_DIR_KEY))
    run = run_folder(checkpoint)
    if run is not None and (run / ".hydra" / "overrides.yaml").is_file():
        return CommandLine(tuple(str(override) for override in OmegaConf.load(run / ".hydra" / "overrides.yaml")))
    return None


def resume_command_line(given: CommandLine) -> CommandLine:
    """train's command line with a resume by checkpoint alone filled in: with ``ckpt_path=<file>``, the
    overrides of the run that wrote it are added (those given now win, key by key), so is its config folder
    unless one is given, and the run continues in its own folder (``hydra.run.dir``, unless given).
    ``check_resume_config`` later refuses overrides that would change the model or the data. Sweeps,
    ``ckpt_path=last`` and checkpoints that saved no command line are left as they are."""
    if any(argument in MULTIRUN_FLAGS for argument in given.overrides):
        return given
    parser = OverridesParser.create()
    keys = {key: argument for argument in given.overrides if (key := override_key(argument, parser)) is not None}
    if "ckpt_path" not in keys:
        return given
    ckpt_path = parser.parse_override(keys["ckpt_path"]).value()
    if not isinstance(ckpt_path, str) or ckpt_path == LAST or not Path(ckpt_path).is_file():
        return given  # no file to read: the resume checks name the problem
    saved = saved_command_line(Path(ckpt_path))
    if saved is None:
        return given
    kept = [o for o in saved.overrides if override_key(o, parser) not in (*keys, *NOT_RESUMED)]
    run = run_folder(Path(ckpt_path))
    folder = [] if RUN_DIR in keys or run is None else [f"{RUN_DIR}={hydra_value(str(run))}"]
    config_dir = given.config_dir or saved.config_dir
    where = f" in {run}" if folder else ""
    searched = f" and configs from {config_dir}" if config_dir and not given.config_dir else ""
    print(
        f"resuming {ckpt_path}{where} with its run's overrides: {' '.join(kept) or '(none)'}{searched}",
        file=sys.stderr,
    )
    return CommandLine((*given.overrides, *kept, *folder), config_dir)


def newest_last_checkpoint(run_dir: Path) -> Optional[Path]:
    """The most recently written ``last.ckpt`` anywhere under ``run_dir`` (a multirun's job folders included)."""
    found = [path for path in run_dir.rglob(LAST_NAME) if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def requeued_slurm_job() -> bool:
    """This process belongs to a SLURM job that was requeued (preempted, or requeued after the warning signal)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resume_path(ckpt_path: Optional[str], run_dir: Optional[Path]) -> Optional[str]:
    """The checkpoint to resume from: ``ckpt_path`` itself, the newest last.ckpt of ``run_dir`` for
    ``ckpt_path=last``, or for a requeued SLURM job without ``ckpt_path`` that one if there is one."""
    if ckpt_path == LAST:
        if run_dir is None:
            raise ValueError("ckpt_path=last needs the run folder to look in; give a checkpoint file instead")
        found = newest_last_checkpoint(run_dir)
        if found is None:
            raise ValueError(
                f"ckpt_path=last found no {LAST_NAME} under {run_dir} (searched {run_dir}/**/{LAST_NAME}); give the "
                "folder of the run to resume as hydra.run.dir=<run folder>, or a checkpoint file as ckpt_path"
            )
        return str(found)
    if ckpt_path is None and run_dir is not None and requeued_slurm_job():
        found = newest_last_checkpoint(run_dir)
        if found is None:
            rank_zero_warn(
                f"requeued SLURM job: no {LAST_NAME} under {run_dir}, so it starts from scratch; to resume, give every "
                "start of the job the same run folder, e.g. hydra.run.dir=outputs/slurm-$SLURM_JOB_ID"
            )
            return None
        rank_zero_info(f"requeued SLURM job: resuming from {found}")
        return str(found)
    return ckpt_path


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"group.key": value}``; lists are values."""
    items: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            items.update(flat(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def trained_config(checkpoint: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The flat config a checkpoint was trained with: the whole of it where train.py saved it, else the
    model's part from the module's hyperparameters (checkpoints written before the config was saved)."""
    if isinstance(checkpoint.get(CONFIG_KEY), Mapping):
        return flat(checkpoint[CONFIG_KEY])
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or not all(
        isinstance(hparams.get(k), Mapping) for k in ("joiner", "head", "optim")
    ):
        return None
    joiner = hparams["joiner"]
    return flat({**joiner, "model": hparams["head"], **hparams["optim"]})


def shown(value: Any) -> str:
    return "null" if value is None else str(value)


def check_resume_config(path: str | os.PathLike, config: Config) -> None:
    """Fail in one line when ``config`` differs from the checkpoint's config in keys outside ``MAY_CHANGE``."""
    checkpoint = mapped_checkpoint(path)
    trained = trained_config(checkpoint) if isinstance(checkpoint, Mapping) else None
    if trained is None:
        return
    current = flat(asdict(config))
    differ = [key for key in trained if key in current and trained[key] != current[key] and not may_change(key)]
    if not differ:
        return
    listed = "; ".join(
        f"{key}: {shown(trained[key])} in the checkpoint, {shown(current[key])} now" for key in differ[:SHOWN_KEYS]
    )
    if len(differ) > SHOWN_KEYS:
        listed += f"; and {len(differ) - SHOWN_KEYS} more"
    run_config = Path(path).resolve().parent.parent / ".hydra" / "config.yaml"
    source = (
        f"its run's config is {run_config}"
        if run_config.is_file()
        else "resume with the config of the run that wrote it"
    )
    raise ValueError(
        f"ckpt_path={os.fspath(path)!r} was trained with another config ({listed}); {source}. "
        f"To start a new run from these weights with another model, use init_from={os.fspath(path)} instead of ckpt_path"
    )


def check_resume_classes(path: str | os.PathLike, class_names: Sequence[str]) -> None:
    """Fail in one line when the data's classes (a COCO folder's categories) are not those the checkpoint's head
    was trained on: its class rows would not fit."""
    checkpoint = mapped_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    trained = hparams.get("class_names") if isinstance(hparams, Mapping) else None
    if trained is not None and list(trained) != list(class_names):
        raise ValueError(
            f"ckpt_path={os.fspath(path)!r} was trained on the classes {list(trained)}, the data has {list(class_names)}; "
            f"resume with the run's data, or start a new run from these weights with init_from={os.fspath(path)} "
            "instead of ckpt_path (it carries class rows over by name)"
        )


def resumed(config: Config, run_dir: Optional[Path]) -> Config:
    """``config`` with the checkpoint to resume from as ``ckpt_path`` (see ``resume_path``), once that file
    is whole and was trained with a config that fits. A requeued job resumes rather than starting afresh
    from ``init_from``."""
    ckpt_path = resume_path(config.ckpt_path, run_dir)
    if ckpt_path is None:
        return config
    check_resume_checkpoint(ckpt_path)
    config = replace(config, ckpt_path=ckpt_path, init_from=None)
    check_resume_config(ckpt_path, config)
    return config
