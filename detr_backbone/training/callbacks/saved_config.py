"""Every checkpoint carries the composed config of the run that wrote it, so that a resume can be
checked against it before anything is built (``training/resume.py``)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

CONFIG_KEY = "config"


class SavedConfig(Callback):
    """Puts ``config`` (plain containers, so the checkpoint loads with ``weights_only=True``) under
    ``checkpoint["config"]``."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config
