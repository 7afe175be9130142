"""Every checkpoint carries the composed config of the run that wrote it, so that a resume can be
checked against it before anything is built, and the command line that composed it (Hydra's overrides
and the user's config folder), so that ``ckpt_path=<file>`` alone resumes the run (``training/resume.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from ...inference.checkpoint import RUN_CONFIG_KEY

CONFIG_KEY = RUN_CONFIG_KEY
OVERRIDES_KEY, CONFIG_DIR_KEY = "overrides", "config_dir"


@dataclass(frozen=True)
class CommandLine:
    """What composed a run's config besides the package's configs: Hydra's overrides, and the folder of
    the user's own configs (``--config-dir``, absolute) if one was searched."""

    overrides: tuple[str, ...] = ()
    config_dir: Optional[str] = None


NO_COMMAND_LINE = CommandLine()  # a job built in code: a resume repeats its config by hand


class SavedConfig(Callback):
    """Puts ``config`` (plain containers, so the checkpoint loads with ``weights_only=True``) under
    ``checkpoint["config"]``, and the command line under ``checkpoint["overrides"]`` and ``["config_dir"]``."""

    def __init__(self, config: dict[str, Any], command_line: CommandLine = NO_COMMAND_LINE):
        self.config = config
        self.command_line = command_line

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config
        checkpoint[OVERRIDES_KEY] = list(self.command_line.overrides)
        checkpoint[CONFIG_DIR_KEY] = self.command_line.config_dir
