"""conf/hparams_search/: an Optuna study run by train.py, its best trial, and a failed trial that does not end it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from omegaconf import OmegaConf

from detr_backbone.training.objective import MetricNotLoggedError, optimized_value

from .jobs import ROOT, TINY

PARSER = OverridesParser.create()


def search_space() -> dict[str, str]:
    """The preset's searched keys and their sweep expressions, e.g. ``{"lr": "tag(log, interval(...))"}``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hparams_search=detr_optuna"], return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params)


SEARCHED = search_space()
# The tiny job, minus the head sizes it pins, so that the study samples every searched key.
JOB = [o for o in TINY if o.split("=")[0] not in SEARCHED] + [
    "test_after_fit=false",
    "callbacks.predictions.enabled=false",
]


def in_range(expression: str, value: float) -> bool:
    sweep = PARSER.parse_override(f"key={expression}").value()
    if isinstance(sweep, ChoiceSweep):
        return value in sweep.list
    assert isinstance(sweep, IntervalSweep)
    return sweep.start <= value <= sweep.end


def run_study(sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "hparams_search=detr_optuna",
            "hydra.sweeper.n_trials=2",
            *JOB,
            *overrides,
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=sweep.parent,
        env=env,
        timeout=240,
    )


def logged(trial: Path, key: str) -> list[float]:
    """Every value of ``key`` the trial's CSV logger wrote."""
    with (trial / "csv" / "metrics.csv").open() as stream:
        return [float(row[key]) for row in csv.DictReader(stream) if row.get(key)]


def sampled(trial: Path) -> dict[str, float]:
    """The searched keys' values the trial ran with, from the overrides Hydra saved."""
    pairs = (override.split("=", 1) for override in OmegaConf.load(trial / ".hydra" / "overrides.yaml"))
    return {key: float(value) for key, value in pairs if key in SEARCHED}


@pytest.mark.slow
def test_study_reports_its_best_trial_within_the_searched_ranges(tmp_path):
    # The tiny job's mAP is often 0 in every trial; its validation cross-entropy always tells them apart.
    sweep = tmp_path / "study"
    result = run_study(sweep, "optimized_metric=val/loss_ce", "hydra.sweeper.direction=minimize")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [sweep / "0", sweep / "1"]
    values = [logged(trial, "val/loss_ce")[-1] for trial in trials]
    assert values[0] != values[1]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(values))
    assert set(best.best_params) == set(SEARCHED)
    assert dict(best.best_params) == pytest.approx(sampled(trials[values.index(min(values))]))
    for key, value in best.best_params.items():
        assert in_range(SEARCHED[key], value), (key, value, SEARCHED[key])


@pytest.mark.slow
def test_a_failing_trial_is_recorded_as_failed_and_the_study_goes_on(tmp_path):
    # Trial n runs with model.nheads=n: trial 0 fails the config's validation, trial 1 trains.
    sweep = tmp_path / "study"
    result = run_study(sweep, "model.nheads=${hydra:job.num}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Failed experiment: model.nheads=0 must be > 0" in result.stdout + result.stderr
    assert not (sweep / "0" / "csv").exists()
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(logged(sweep / "1", "val/map_50")))  # the checkpoint's best score
    assert dict(best.best_params) == pytest.approx(sampled(sweep / "1"))


def test_optimized_value_reports_what_a_sweeper_can_rank():
    logged_metrics = {"val/map_50": 0.25, "val/loss": 1.5}
    assert optimized_value("val/map_50", logged_metrics, "val/map_50", 0.5) == 0.5  # the best epoch, not the last
    assert optimized_value("val/loss", logged_metrics, "val/map_50", 0.5) == 1.5
    assert optimized_value("val/map_50", logged_metrics, "val/map_50", None) is None  # no checkpoint was scored
    assert optimized_value("val/loss", {"val/loss": float("nan")}, "val/map_50", None) is None
    assert optimized_value("val/map_50", {}, "val/map_50", float("-inf")) is None
    with pytest.raises(MetricNotLoggedError, match="'val/mAP'.*val/loss, val/map_50"):
        optimized_value("val/mAP", logged_metrics, "val/map_50", 0.5)
