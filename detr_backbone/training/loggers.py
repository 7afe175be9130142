"""The run's loggers (conf/logger/): CSV and TensorBoard files, and the experiment trackers W&B and MLflow.

The trackers are optional extras that work without a network: W&B runs offline unless it has been set
up on this machine, MLflow writes a file store inside the run folder unless a tracking URI is given.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pytorch_lightning as pl
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor

from ..validation import require
from .config import Config, LoggerConfig, MLflowConfig, WandbConfig

if TYPE_CHECKING:
    from wandb import Settings

TRACKERS = ("wandb", "mlflow")  # LoggerConfig keys; each is also the module's and the pip extra's name
MLFLOW_URI_VARIABLE = "MLFLOW_TRACKING_URI"


def check_trackers(cfg: LoggerConfig) -> None:
    """Fail before anything is built when a configured tracker's package is missing."""
    for name in TRACKERS:
        if getattr(cfg, name) is not None:
            require(
                importlib.util.find_spec(name) is not None,
                f'logger={name} needs the {name} package: pip install -e ".[{name}]"',
            )


def wandb_mode(configured: str | None, settings: Settings) -> str | None:
    """The mode for ``wandb.init``: the configured one; else None, W&B's own choice, once the user has
    set W&B up (a mode from WANDB_MODE or ``wandb offline``, or credentials from WANDB_API_KEY, an
    identity token file or a ``wandb login`` netrc entry); else offline, so no run asks for a login.

    ``settings`` are W&B's own, read from the environment and its settings files as ``wandb.init`` reads them.
    """
    from wandb.sdk.lib.wbauth import read_netrc_auth

    if configured is not None:
        return configured
    set_up = (
        "mode" in settings.model_fields_set
        or settings.api_key
        or settings.identity_token_file
        or read_netrc_auth(host=settings.base_url)
    )
    return None if set_up else "offline"


class AppendingMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it keeps an existing metrics.csv and appends to it."""

    def _check_log_dir_exists(self) -> None:
        # Lightning's writer deletes the file here; a resumed run continues it, under the same header
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class ResumedCSVLogger(CSVLogger):
    """The CSV log of a run resumed in its own folder: the earlier part's rows stay in metrics.csv."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingMetricsWriter(log_dir=self.log_dir)
        return self._experiment


def mlflow_tracking_uri(configured: str | None, run_dir: Path) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else a file store in ``<run_dir>/mlruns``."""
    return configured or os.environ.get(MLFLOW_URI_VARIABLE) or (run_dir / "mlruns").resolve().as_uri()


class WandbTracker(WandbLogger):
    """W&B, whose run config is the job's whole composed config (see ``log_hyperparams``)."""

    def __init__(self, config: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        # Lightning hands every logger the module's and data module's hparams at fit start: a subset
        # of the composed config under other names, and the data seed as ``seed``, which would shadow
        # the job's seed. The trackers record the composed config instead.
        super().log_hyperparams(self.config)


class MLflowTracker(MLFlowLogger):
    """MLflow, whose params are the job's whole composed config, flattened to ``group/key`` names
    (Lightning cuts each value to MLflow's length limit); ``config.yaml`` keeps it whole."""

    def __init__(self, config: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.user_uri = os.environ.get(MLFLOW_URI_VARIABLE)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        # the composed config instead of the module's hparams, as in WandbTracker
        super().log_hyperparams(self.config)
        self.experiment.log_dict(self.run_id, self.config, "config.yaml")

    def finalize(self, status: str = "success") -> None:
        super().finalize(status)
        # MLflow exports the URI it is set to as MLFLOW_TRACKING_URI, for subprocesses: put the user's
        # back, or the next job of a multirun in this process would write to this job's store
        if self.user_uri is None:
            os.environ.pop(MLFLOW_URI_VARIABLE, None)
        else:
            os.environ[MLFLOW_URI_VARIABLE] = self.user_uri


def build_wandb(cfg: WandbConfig, config: dict[str, Any], run_dir: Path) -> WandbTracker:
    from wandb.sdk import wandb_setup

    return WandbTracker(
        config,
        save_dir=run_dir,  # W&B's folder: <run_dir>/wandb/
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name,
        group=cfg.group,
        tags=cfg.tags or None,
        mode=wandb_mode(cfg.mode, wandb_setup.singleton().settings),
    )


def build_mlflow(cfg: MLflowConfig, config: dict[str, Any], run_dir: Path) -> MLflowTracker:
    uri = mlflow_tracking_uri(cfg.tracking_uri, run_dir)
    if urlparse(uri).scheme in ("", "file"):
        # MLflow 3 refuses its file store unless opted in (it steers towards a database); the file
        # store is the one that needs neither a server nor the full mlflow package
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLflowTracker(
        config, experiment_name=cfg.experiment_name, run_name=cfg.run_name, tracking_uri=uri, tags=cfg.tags or None
    )


def build_loggers(config: Config, run_dir: Path) -> list[Logger]:
    cfg = config.logger
    loggers: list[Logger] = []
    if cfg.csv:
        resumed = config.ckpt_path is not None
        loggers.append((ResumedCSVLogger if resumed else CSVLogger)(run_dir, name="csv", version=""))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    if cfg.wandb is not None:
        loggers.append(build_wandb(cfg.wandb, asdict(config), run_dir))
    if cfg.mlflow is not None:
        loggers.append(build_mlflow(cfg.mlflow, asdict(config), run_dir))
    return loggers


def log_image(logger: Logger, key: str, image: Tensor, step: int) -> None:
    """A uint8 (3, H, W) image into ``logger`` if it keeps images (TensorBoard, W&B, MLflow); others skip it."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, image, global_step=step)
        return
    pixels = image.permute(1, 2, 0).cpu().numpy()  # the trackers take (H, W, 3) arrays
    if isinstance(logger, WandbLogger):
        logger.log_image(key, [pixels], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, pixels, key=key, step=step)


class FinishWandbRun(Callback):
    """Finishes the W&B run after the job's last stage (or a failure): wandb keeps a run open until
    the process exits, and the next job of a multirun in this process would log into it."""

    def __init__(self, last_stage: str):
        self.last_stage = last_stage

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == self.last_stage:
            finish_wandb(trainer, exit_code=0)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        finish_wandb(trainer, exit_code=1)


def finish_wandb(trainer: pl.Trainer, exit_code: int) -> None:
    if trainer.is_global_zero:
        import wandb

        wandb.finish(exit_code=exit_code)  # a no-op when no run was started


def tracker_callbacks(cfg: Config) -> list[Callback]:
    return [] if cfg.logger.wandb is None else [FinishWandbRun(last_stage="test" if cfg.test_after_fit else "fit")]
