"""One training job from a composed config: data, model, callbacks, loggers, Trainer; fit, then test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf
from pytorch_lightning.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from pytorch_lightning.profilers import AdvancedProfiler, Profiler, SimpleProfiler
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

from ..config import JoinerConfig
from ..data import build_datamodule
from ..detection import HEADS, record_of
from ..validation import require
from .callbacks.augment_phase import AugmentPhase
from .callbacks.ema import EmaWeights
from .callbacks.last_checkpoint import LastCheckpoint
from .callbacks.loss_guard import NON_FINITE_ACTIONS, NonFiniteLossGuard
from .callbacks.model_summary import ParameterSummary
from .callbacks.prediction_grid import PredictionGrid
from .callbacks.preemption import cluster_plugins
from .callbacks.saved_config import NO_COMMAND_LINE, CommandLine
from .checkpoint_io import AtomicCheckpointIO
from .compile_padding import padded_for_compile, warn_of_compile_cost
from .config import CallbacksConfig, Config
from .faults import ended_cleanly, fault_callbacks
from .init_from import initialize_from, without_backbone_weights
from .loggers import build_loggers, check_trackers, tracker_callbacks
from .module import DetrModule
from .objective import optimized_value
from .recipe import warn_of_recipe_mismatch
from .resume import check_resume_classes, resumed

PROGRESS_BARS = {"tqdm": TQDMProgressBar, "rich": RichProgressBar}
PROFILERS = {"simple": SimpleProfiler, "advanced": AdvancedProfiler}


def validated(cfg: DictConfig | Config, run_dir: Path | None = None) -> Config:
    """The composed config as schema objects: every group's own checks run here, before any work.
    ``run_dir``, the run's folder, is where ``ckpt_path=last`` and a requeued SLURM job find last.ckpt."""
    try:
        config = cfg if isinstance(cfg, Config) else OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:  # a ??? left unset, e.g. backbone=custom without backbone._target_
        raise ValueError(
            f"{error.full_key} is not set: give it on the command line ({error.full_key}=...) or in your config"
        ) from None
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
    require(
        config.trainer.profiler in (None, *PROFILERS),
        f"trainer.profiler={config.trainer.profiler!r} is not one of {', '.join(PROFILERS)}, null",
    )
    check_trackers(config.logger)
    require(
        config.init_from is None or config.ckpt_path is None,
        f"init_from={config.init_from!r} and ckpt_path={config.ckpt_path!r} exclude each other: ckpt_path resumes "
        "a run (step, optimizer, schedule), init_from starts a new one from a detector's weights; set one",
    )
    readers = [name for name, head in HEADS.items() if head.architecture is not None]
    require(
        config.init_from is None or record_of(config.model).architecture is not None,
        f"init_from={config.init_from!r}: model._target_={config.model._target_!r} is a head that reads no "
        f"published weights yet; heads that do: {', '.join(readers)} (model=<name>)",
    )
    JoinerConfig.from_args(config)  # cross-field checks of the Joiner's knobs
    warn_of_compile_cost(config)
    return resumed(padded_for_compile(config), run_dir)


def build_callbacks(cfg: CallbacksConfig, run_dir: Path) -> list[Callback]:
    checkpoint = cfg.checkpoint
    # epoch004-val_map_50-0.7430.ckpt: no "=" in the name, so that ckpt_path=<it> needs no quotes as a Hydra override
    metric = checkpoint.monitor.replace("/", "_")
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename=f"epoch{{epoch:03d}}-{metric}-{{{checkpoint.monitor}:.4f}}",
            auto_insert_metric_name=False,
            monitor=checkpoint.monitor,
            mode=checkpoint.mode,
            save_top_k=checkpoint.save_top_k,
            every_n_epochs=checkpoint.every_n_epochs,
        ),
        NonFiniteLossGuard(cfg.non_finite_loss),
        # there with the average off too: it resumes a checkpoint written with it on from the trained weights
        EmaWeights(cfg.ema.decay if cfg.ema.enabled else None, cfg.ema.warmup_steps),
        AugmentPhase(),  # does nothing when the data has no augmentation policy
    ]
    stopping = cfg.early_stopping
    if stopping.enabled:
        callbacks.append(
            EarlyStopping(
                monitor=stopping.monitor, mode=stopping.mode, patience=stopping.patience, min_delta=stopping.min_delta
            )
        )
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
            PredictionGrid(
                run_dir / "predictions", predictions.num_images, predictions.score_threshold, predictions.image_side
            )
        )
    return callbacks


def build_profiler(name: str | None, run_dir: Path) -> Profiler | None:
    """Lightning's profiler of that name, writing <run>/<stage>-profiler.txt (named only, it just prints)."""
    return None if name is None else PROFILERS[name](dirpath=run_dir, filename="profiler")


def own_config_targets(cfg: Config) -> list[str]:
    """The run's own targets: its config is the user's, so what it names may be built (unlike a checkpoint's)."""
    return [cfg.backbone._target_, cfg.position._target_, cfg.model._target_]


def build_module(cfg: Config, num_classes: int, class_names: Sequence[str] | None = None) -> DetrModule:
    joiner = {
        "backbone": cfg.backbone,
        "position": cfg.position,
        "hidden_dim": cfg.hidden_dim,
        "lr_backbone": cfg.lr_backbone,
    }
    optim = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "lr_drop": cfg.lr_drop, **asdict(cfg.optimizer)}
    return DetrModule(
        joiner,
        asdict(cfg.model),
        optim,
        num_classes,
        class_names,
        allowed_targets=own_config_targets(cfg),
        evaluation=asdict(cfg.evaluation),
    )


def epochs_for_steps(cfg: Config, train_images: int, trainer: pl.Trainer) -> int:
    """``trainer.max_epochs``, or the epochs that hold ``min_train_steps`` optimizer steps when there are more."""
    batches = math.ceil(math.ceil(train_images / trainer.world_size) / cfg.data.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.trainer.accumulate_grad_batches)
    return max(cfg.trainer.max_epochs, math.ceil(cfg.min_train_steps / steps_per_epoch))


class Job:
    """The objects of one run, built up front so that a bad config fails before any training.
    ``command_line``, what composed ``cfg``, is saved in its checkpoints for a resume."""

    def __init__(self, cfg: Config, run_dir: Path, command_line: CommandLine = NO_COMMAND_LINE):
        pl.seed_everything(cfg.seed, workers=True)
        warn_of_recipe_mismatch(cfg)
        self.cfg = cfg
        self.run_dir = run_dir
        self.datamodule = build_datamodule(cfg.data, cfg.model.input)
        class_names = self.datamodule.class_names
        if cfg.ckpt_path is not None:
            check_resume_classes(cfg.ckpt_path, class_names)  # before the model is built
        # init_from sets every weight, so the backbone's own sources (ImageNet, backbone.checkpoint) are not read
        self.module = build_module(
            without_backbone_weights(cfg) if cfg.init_from else cfg, len(class_names), class_names
        )
        self.init_report = (
            None if cfg.init_from is None else initialize_from(self.module.detector, self.module.config, cfg, run_dir)
        )
        callbacks = build_callbacks(cfg.callbacks, run_dir)
        self.checkpoint = callbacks[0]
        trainer_args = asdict(cfg.trainer)
        # without a bar of our choosing, Lightning would add its default one
        trainer_args["enable_progress_bar"] &= cfg.callbacks.progress_bar != "none"
        trainer_args["profiler"] = build_profiler(cfg.trainer.profiler, run_dir)
        self.trainer = pl.Trainer(
            **trainer_args,
            callbacks=[*callbacks, *tracker_callbacks(cfg), *fault_callbacks(cfg, run_dir, command_line)],
            logger=build_loggers(cfg, run_dir) or False,
            default_root_dir=run_dir,
            plugins=[AtomicCheckpointIO(), *cluster_plugins()],  # a killed write never corrupts last.ckpt
        )
        if cfg.min_train_steps is not None:
            self.trainer.fit_loop.max_epochs = epochs_for_steps(
                cfg, len(self.datamodule.dataset("train")), self.trainer
            )

    def run(self) -> float | None:
        """Fit (resuming from ``ckpt_path`` if set; ``init_from`` was applied when the job was built),
        test the best checkpoint, return ``optimized_metric``. Preemption and a full disk end it in one-line errors."""
        with ended_cleanly(self.trainer, self.run_dir):
            self.trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=self.cfg.ckpt_path)
            logged = dict(self.trainer.callback_metrics)  # the test replaces the fit's metrics with its own
            if self.cfg.test_after_fit:
                self.trainer.test(
                    self.module, datamodule=self.datamodule, ckpt_path=self.checkpoint.best_model_path or None
                )
                logged.update(self.trainer.callback_metrics)
        checkpoint = self.checkpoint
        return optimized_value(self.cfg.optimized_metric, logged, checkpoint.monitor, checkpoint.best_model_score)
