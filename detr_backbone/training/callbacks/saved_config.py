"""Every checkpoint carries the composed config of the run that wrote it, so that a resume can be
checked against it before anything is built, and the command-line overrides that composed it, so that
``ckpt_path=<file>`` alone resumes the run (``training/resume.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from ...inference.checkpoint import RUN_CONFIG_KEY

CONFIG_KEY = RUN_CONFIG_KEY
OVERRIDES_KEY = "overrides"


class SavedConfig(Callback):
    """Puts ``config`` (plain containers, so the checkpoint loads with ``weights_only=True``) under
    ``checkpoint["config"]`` and the Hydra overrides it was composed with under ``checkpoint["overrides"]``."""

    def __init__(self, config: dict[str, Any], overrides: Sequence[str] = ()):
        self.config = config
        self.overrides = list(overrides)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config
        checkpoint[OVERRIDES_KEY] = self.overrides
