"""callbacks.early_stopping: Lightning's EarlyStopping on the checkpoint's metric ends a run early."""

from __future__ import annotations

import csv

import pytest
import torch

from detr_backbone.training.job import Job, validated

from .jobs import SMALL, compose_config


def test_a_run_without_improvement_stops_after_patience_validations(tmp_path, one_thread):
    # mAP@0.5 lies in [0, 1]: after the first validation, no change can exceed min_delta=1
    cfg = validated(
        compose_config(
            *SMALL,
            "trainer.max_epochs=6",
            "trainer.num_sanity_val_steps=0",
            "callbacks.early_stopping.enabled=true",
            "callbacks.early_stopping.patience=2",
            "callbacks.early_stopping.min_delta=1.0",
        )
    )
    assert (cfg.callbacks.early_stopping.monitor, cfg.callbacks.early_stopping.mode) == ("val/map_50", "max")
    job = Job(cfg, tmp_path)
    job.run()
    with (tmp_path / "csv" / "metrics.csv").open() as stream:
        validated_epochs = [int(row["epoch"]) for row in csv.DictReader(stream) if row["val/map_50"]]
    assert validated_epochs == [0, 1, 2]  # the first, then two without improvement
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (2, 3 * 4)  # 4 steps an epoch
    assert job.trainer.current_epoch == 3 and job.trainer.should_stop


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.early_stopping.mode=up", "callbacks.early_stopping.mode='up' is not one of max, min"),
        ("callbacks.early_stopping.patience=0", "callbacks.early_stopping.patience=0 must be >= 1"),
        ("callbacks.early_stopping.min_delta=-0.1", "callbacks.early_stopping.min_delta=-0.1 must be >= 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        validated(compose_config(*SMALL, override))
