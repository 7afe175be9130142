"""Helpers shared by the tests: compose the real conf/ tree, and the overrides of a job small enough for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from detr_backbone.training.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
register_configs()

# A few steps on a handful of tiny images: enough to exercise the whole job in seconds.
TINY = [
    "backbone=resnet18",
    "model=detr_small",
    "hidden_dim=32",
    "model.enc_layers=1",
    "model.dec_layers=1",
    "model.dim_feedforward=64",
    "model.num_queries=5",
    "lr=2e-4",  # the tests' recipe: the default job's 4e-4 goes with its batch of 16
    "lr_backbone=2e-4",
    "optimizer.schedule=step",  # and DETR's schedule, not the default job's warm-up and flat-cosine
    "optimizer.warmup_steps=0",
    "data.train_size=8",
    "data.val_size=4",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.persistent_workers=false",
    "data.min_size=64",
    "data.max_size=80",
    "trainer.max_epochs=1",
    "callbacks.progress_bar=none",
    "trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
]


# Smaller still, for jobs that run several times in one test: 8 images of 32-48 pixels in batches of 2,
# a ResNet-18-GN cut after layer2, no picture or summary callbacks, no test after fitting.
SMALL = [
    *(o for o in TINY if not o.startswith(("backbone=", "data.batch_size", "data.min_size", "data.max_size"))),
    "backbone=resnet18_gn",
    "data.batch_size=2",
    "data.min_size=32",
    "data.max_size=48",
    "data.train_size=8",
    "data.val_size=2",
    "callbacks.predictions.enabled=false",
    "callbacks.parameter_summary=false",
    "test_after_fit=false",
]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
