"""The training job's step: the Lightning loop against a plain PyTorch loop, the default job's fast
paths, and how fast the data module feeds batches."""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from detr_backbone.data import build_datamodule
from detr_backbone.training.config import Config, register_configs
from detr_backbone.training.job import build_module, validated
from detr_backbone.training.module import DetrModule

from .machine import synchronize
from .timing import interleaved_medians

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def job_config(overrides: Sequence[str] = ()) -> Config:
    """conf/config.yaml as train.py composes it (the CPU default job unless overridden)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validated(compose(config_name="config", overrides=list(overrides)))


def with_fast_paths(cfg: Config, channels_last: bool, cache_size: int) -> Config:
    backbone = dataclasses.replace(cfg.backbone, channels_last=channels_last)
    return dataclasses.replace(
        cfg, backbone=backbone, position=dataclasses.replace(cfg.position, cache_size=cache_size)
    )


def to_device(batch, device: torch.device):
    images, targets = batch
    return images.to(device), [{key: value.to(device) for key, value in target.items()} for target in targets]


def training_batches(cfg: Config, count: int) -> list:
    """The first ``count`` batches of the job's training loader (collated once, replayed by every loop)."""
    datamodule = build_datamodule(dataclasses.replace(cfg.data, num_workers=0, persistent_workers=False))
    return list(itertools.islice(datamodule.train_dataloader(), count))


def plain_step(module: DetrModule, optimizer: torch.optim.Optimizer, batch, clip_max_norm: float) -> None:
    """What Lightning's automatic optimisation does for this module, written out."""
    images, targets = batch
    loss = module.criterion.weighted_total(module.criterion(module(images, targets), targets))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip_max_norm)
    optimizer.step()


class StepClock(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self.end = time.perf_counter()


def lightning_seconds_per_step(
    module: DetrModule, cfg: Config, batches: list, warmup: int, device: torch.device, log_dir: str
) -> float:
    clock = StepClock(warmup)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=len(batches),
        gradient_clip_val=cfg.clip_max_norm,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(log_dir, name="csv"),
        callbacks=[LearningRateMonitor(logging_interval="step"), clock],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replayed-batch loader has no workers, on purpose
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return (clock.end - clock.start) / (len(batches) - warmup)


def plain_seconds_per_step(module: DetrModule, cfg: Config, batches: list, warmup: int, device: torch.device) -> float:
    optimizer = module.build_optimizer()
    module.train()
    start = 0.0
    for index, batch in enumerate(DataLoader(batches, batch_size=None)):
        if index == warmup:
            start = time.perf_counter()
        plain_step(module, optimizer, to_device(batch, device), cfg.clip_max_norm)
    synchronize(device)
    return (time.perf_counter() - start) / (len(batches) - warmup)


def lightning_overhead(cfg: Config, steps: int, warmup: int, repeats: int, device: torch.device) -> dict:
    """Seconds per training step of the job's module under Lightning and under the plain loop (same
    initial weights, batches, optimizer groups and clipping), alternating runs; overhead of the medians."""
    batches = training_batches(cfg, steps)
    pl.seed_everything(cfg.seed, verbose=False)
    initial = build_module(cfg, num_classes(cfg)).to(device)
    lightning, plain = [], []
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(repeats):
            lightning.append(lightning_seconds_per_step(copy.deepcopy(initial), cfg, batches, warmup, device, log_dir))
            plain.append(plain_seconds_per_step(copy.deepcopy(initial), cfg, batches, warmup, device))
    lightning_s, plain_s = statistics.median(lightning), statistics.median(plain)
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "repeats": repeats,
        "batch_size": cfg.data.batch_size,
        "lightning_s_per_step": lightning_s,
        "plain_s_per_step": plain_s,
        "lightning_runs_s": lightning,
        "plain_runs_s": plain,
        "overhead_pct": 100 * (lightning_s / plain_s - 1),
        "lightning_setup": "CSV logger every log_every_n_steps, lr monitor, gradient clipping; no progress bar, no validation",
    }


def num_classes(cfg: Config) -> int:
    return build_datamodule(cfg.data).num_classes


def default_job_fast_paths(cfg: Config, steps: int, repeats: int, warmup: int, device: torch.device) -> dict:
    """Seconds per plain-loop training step of the default job's detector with each fast path on and off
    (torch.compile: benchmarks/compiled.py, which pads the batches as compiling does)."""
    variants = {
        "plain": with_fast_paths(cfg, channels_last=False, cache_size=0),
        "channels_last": with_fast_paths(cfg, channels_last=True, cache_size=0),
        "pos_cache": with_fast_paths(cfg, channels_last=False, cache_size=32),
        "default": cfg,
    }
    batches = [to_device(batch, device) for batch in training_batches(cfg, steps)]
    classes = num_classes(cfg)
    calls: dict[str, Callable[[], None]] = {}
    for name, variant in variants.items():
        pl.seed_everything(cfg.seed, verbose=False)
        module = build_module(variant, classes).to(device).train()
        optimizer = module.build_optimizer()
        stream = itertools.cycle(batches)
        calls[name] = lambda module=module, optimizer=optimizer, stream=stream: plain_step(
            module, optimizer, next(stream), cfg.clip_max_norm
        )
    times = interleaved_medians(calls, repeats, warmup, device)
    plain_s = times["plain"]["median_s"]
    return {
        "backbone": dataclasses.asdict(cfg.backbone),
        "batch_size": cfg.data.batch_size,
        "image_sides": [cfg.data.min_size, cfg.data.max_size],
        "variants": {
            name: {**timing, "speedup_vs_plain": plain_s / timing["median_s"]} for name, timing in times.items()
        },
    }


def loader_rate(data, batches: int, warm: bool) -> float:
    """Batches per second of a training loader over its first ``batches`` batches (first excluded);
    ``warm`` times a second pass, once a cached dataset holds every image of the first."""
    loader = build_datamodule(data).train_dataloader()
    for _ in range(2 if warm else 1):  # without set_epoch, both passes serve the same order
        batch_iterator = iter(loader)
        next(batch_iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(batch_iterator)
        elapsed = time.perf_counter() - start
    del loader, batch_iterator
    gc.collect()  # shut these workers down now, not inside the next loader's forked workers
    return batches / elapsed


def data_loading(cfg: Config, batches: int, worker_counts: Sequence[int]) -> dict:
    """Batches per second the job's training loader delivers: drawing every image with 0, 1, 2
    workers, and from the shapes cache once it is filled (in-process; a worker's cache would last
    only as long as the worker)."""

    def loader(workers: int, cache: bool):
        return dataclasses.replace(cfg.data, num_workers=workers, persistent_workers=workers > 0, cache=cache)

    rates = {str(workers): loader_rate(loader(workers, cache=False), batches, warm=False) for workers in worker_counts}
    return {
        "batches": batches,
        "batches_per_s_by_workers": rates,
        "batches_per_s_cached_in_process": loader_rate(loader(0, cache=True), batches, warm=True),
        "job_loader": {
            field: getattr(cfg.data, field)
            for field in ("num_workers", "pin_memory", "persistent_workers", "size_divisibility", "cache")
        },
    }
