"""One training job from a composed config: data, model, callbacks, loggers, Trainer; fit, then test."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

from ..config import JoinerConfig, require
from ..data import build_datamodule
from .callbacks.last_checkpoint import LastCheckpoint
from .callbacks.loss_guard import NON_FINITE_ACTIONS, NonFiniteLossGuard
from .callbacks.model_summary import ParameterSummary
from .callbacks.prediction_grid import PredictionGrid
from .checkpoint_io import AtomicCheckpointIO, check_resume_checkpoint
from .config import CallbacksConfig, Config, LoggerConfig
from .module import DetrModule

PROGRESS_BARS = {"tqdm": TQDMProgressBar, "rich": RichProgressBar}


def validated(cfg: DictConfig | Config) -> Config:
    """The composed config as schema objects: every group's own checks run here, before any work."""
    config = cfg if isinstance(cfg, Config) else OmegaConf.to_object(cfg)
    require(
        config.callbacks.progress_bar in (*PROGRESS_BARS, "none"),
        f"callbacks.progress_bar={config.callbacks.progress_bar!r} is not one of {', '.join(PROGRESS_BARS)}, none",
    )
    require(
        config.callbacks.progress_bar != "rich" or bool(_RICH_AVAILABLE),
        "callbacks.progress_bar='rich' needs the rich package (pip install rich); use tqdm or none without it",
    )
    require(
        config.callbacks.non_finite_loss in NON_FINITE_ACTIONS,
        f"callbacks.non_finite_loss={config.callbacks.non_finite_loss!r} is not one of {', '.join(NON_FINITE_ACTIONS)}",
    )
    if config.ckpt_path is not None:
        check_resume_checkpoint(config.ckpt_path)
    JoinerConfig.from_args(config)  # cross-field checks of the Joiner's knobs
    return config


def build_callbacks(cfg: CallbacksConfig, run_dir: Path) -> list[Callback]:
    checkpoint = cfg.checkpoint
    metric = checkpoint.monitor.replace("/", "_")
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename=f"epoch{{epoch:03d}}-{metric}{{{checkpoint.monitor}:.4f}}",
            auto_insert_metric_name=False,
            monitor=checkpoint.monitor,
            mode=checkpoint.mode,
            save_top_k=checkpoint.save_top_k,
            every_n_epochs=checkpoint.every_n_epochs,
        ),
        NonFiniteLossGuard(cfg.non_finite_loss),
    ]
    if checkpoint.save_last:
        callbacks.append(LastCheckpoint(run_dir / "checkpoints", checkpoint.every_n_train_steps))
    if cfg.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.progress_bar in PROGRESS_BARS:
        callbacks.append(PROGRESS_BARS[cfg.progress_bar]())
    if cfg.parameter_summary:
        callbacks.append(ParameterSummary())
    predictions = cfg.predictions
    if predictions.enabled:
        callbacks.append(
            PredictionGrid(run_dir / "predictions", predictions.num_images, predictions.score_threshold, predictions.image_side)
        )
    return callbacks


def build_loggers(cfg: LoggerConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(CSVLogger(run_dir, name="csv", version=""))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    return loggers


def build_module(cfg: Config, num_classes: int) -> DetrModule:
    joiner = {"backbone": cfg.backbone, "position": cfg.position, "hidden_dim": cfg.hidden_dim, "lr_backbone": cfg.lr_backbone}
    optim = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "lr_drop": cfg.lr_drop}
    return DetrModule(joiner, asdict(cfg.model), optim, num_classes)


class Job:
    """The objects of one run, built up front so that a bad config fails before any training."""

    def __init__(self, cfg: Config, run_dir: Path):
        pl.seed_everything(cfg.seed, workers=True)
        self.cfg = cfg
        self.datamodule = build_datamodule(cfg.data)
        self.module = build_module(cfg, self.datamodule.num_classes)
        callbacks = build_callbacks(cfg.callbacks, run_dir)
        self.checkpoint = callbacks[0]
        trainer_args = asdict(cfg.trainer)
        # without a bar of our choosing, Lightning would add its default one
        trainer_args["enable_progress_bar"] &= cfg.callbacks.progress_bar != "none"
        self.trainer = pl.Trainer(
            **trainer_args,
            callbacks=callbacks,
            logger=build_loggers(cfg.logger, run_dir) or False,
            default_root_dir=run_dir,
            plugins=[AtomicCheckpointIO()],  # a killed write never corrupts last.ckpt
        )

    def run(self) -> float | None:
        """Fit (resuming from ``ckpt_path`` if set), test the best checkpoint, return the monitored metric."""
        self.trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=self.cfg.ckpt_path)
        if self.cfg.test_after_fit:
            self.trainer.test(self.module, datamodule=self.datamodule, ckpt_path=self.checkpoint.best_model_path or None)
        score = self.checkpoint.best_model_score
        return None if score is None else float(score)
