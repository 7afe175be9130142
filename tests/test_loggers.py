"""The experiment trackers, logger=wandb and logger=mlflow: offline by default, their files in the run folder,
holding the composed config, the metrics and the validation prediction grids."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import wandb
import yaml
from PIL import Image
from wandb.proto.wandb_internal_pb2 import Record
from wandb.sdk import wandb_setup

from detr_backbone.training.job import Job, validated
from detr_backbone.training.loggers import mlflow_tracking_uri, wandb_mode

from .jobs import SMALL, TINY, compose_config

# TINY without the test stage and the part summary: the trackers are what these tests look at
OVERRIDES = [*TINY, "test_after_fit=false", "callbacks.parameter_summary=false"]
SET_UP_BY_USER = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_BASE_URL",
    "WANDB_DIR",
    "MLFLOW_TRACKING_URI",
)


@contextmanager
def no_tracker_set_up(home: Path) -> Iterator[pytest.MonkeyPatch]:
    """An environment where neither W&B nor MLflow has been configured: the default path."""
    with pytest.MonkeyPatch.context() as env:
        for name in SET_UP_BY_USER:
            env.delenv(name, raising=False)
        env.setenv("WANDB_SILENT", "true")
        for name, folder in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
            env.setenv(name, str(home / folder))
        env.setenv("NETRC", str(home / "netrc"))  # no file: no `wandb login` entry
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so that the job's opt-in is undone afterwards
        env.delenv("MLFLOW_ALLOW_FILE_STORE")
        wandb.teardown()  # wandb reads its settings once per process: make it read these
        try:
            yield env
        finally:
            wandb.teardown()


def run_job(run_dir: Path, *overrides: str) -> SimpleNamespace:
    config = validated(compose_config(*overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    Job(config, run_dir).run()
    return SimpleNamespace(dir=run_dir, config=json.loads(json.dumps(asdict(config))))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{name}/")  # {}: no param
        elif value != []:  # Lightning's flattening logs no param for an empty list either
            keys.add(name)
    return keys


# --- W&B -----------------------------------------------------------------------------------------

BLOCK, CHUNK_HEADER, FILE_HEADER = 32 * 1024, 7, 7
FULL, LAST = 1, 4


def wandb_records(path: Path) -> list[Record]:
    """The records of an offline run's ``.wandb`` file: a 7-byte file header, then LevelDB's log
    format (32 KiB blocks of chunks, each with a crc, a little-endian length and a chunk type)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, at = [], b"", FILE_HEADER
    while at + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - at % BLOCK
        length, kind = int.from_bytes(data[at + 4 : at + 6], "little"), data[at + 6]
        if left_in_block < CHUNK_HEADER or kind == 0:  # the padded tail of a block
            at += left_in_block
            continue
        pending += data[at + CHUNK_HEADER : at + CHUNK_HEADER + length]
        at += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture(scope="module")
def wandb_job(tmp_path_factory):
    with no_tracker_set_up(tmp_path_factory.mktemp("home")):
        job = run_job(tmp_path_factory.mktemp("run"), *OVERRIDES, "logger=wandb")
        job.left_open = wandb.run is not None  # before the teardown above, which would close it
    runs = list((job.dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    job.run = runs[0]
    job.records = wandb_records(next(runs[0].glob("run-*.wandb")))
    return job


def of_type(records: list[Record], kind: str) -> list:
    return [getattr(record, kind) for record in records if record.WhichOneof("record_type") == kind]


@pytest.mark.slow
def test_wandb_runs_offline_in_the_run_folder_and_finishes(wandb_job):
    assert not wandb_job.left_open  # finished by the job, not left to the process exit
    exits = of_type(wandb_job.records, "exit")
    assert len(exits) == 1 and exits[0].exit_code == 0


@pytest.mark.slow
def test_wandb_config_is_the_composed_config(wandb_job):
    config = {}
    for update in of_type(wandb_job.records, "config"):
        config.update({item.key: json.loads(item.value_json) for item in update.update})
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    assert config == wandb_job.config
    assert (config["hidden_dim"], config["backbone"]["name"], config["model"]["num_queries"]) == (32, "resnet18", 5)
    assert config["seed"] == 42  # the job's, not the data module's seed that Lightning's hparams carry


@pytest.mark.slow
def test_wandb_gets_the_metrics_and_the_prediction_grid(wandb_job):
    history = [
        {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in row.item}
        for row in of_type(wandb_job.records, "history")
    ]
    map_50 = [row["val/map_50"] for row in history if "val/map_50" in row]
    assert len(map_50) == 1 and 0 <= map_50[0] <= 1
    assert all(np.isfinite(row["train/loss"]) and row["train/loss"] > 0 for row in history if "train/loss" in row)
    (images,) = [row["val/predictions/filenames"] for row in history if "val/predictions/filenames" in row]
    grid = wandb_job.run / "files" / images[0]
    assert grid.parent == wandb_job.run / "files" / "media" / "images" / "val"
    assert np.array_equal(pixels(grid), pixels(wandb_job.dir / "predictions" / "epoch000.png"))


def netrc_entry(path: Path, host_url: str) -> None:
    host = host_url.split("://", 1)[-1].rstrip("/")
    path.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")


def test_wandb_mode_offline_without_setup_else_wandb_decides_and_a_configured_mode_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    bare = wandb.Settings()
    assert wandb_mode(None, bare) == "offline"
    for configured in ("online", "offline", "disabled"):
        assert wandb_mode(configured, bare) == configured
    for variable, value in (("WANDB_MODE", "online"), ("WANDB_MODE", "offline"), ("WANDB_API_KEY", "k" * 40)):
        settings = wandb.Settings()
        settings.update_from_env_vars({variable: value})
        assert wandb_mode(None, settings) is None, variable  # wandb.init applies the user's own setup
        assert wandb_mode("offline", settings) == "offline", variable
    netrc_entry(tmp_path / "netrc", bare.base_url)  # what `wandb login` writes
    assert wandb_mode(None, wandb.Settings()) is None
    assert wandb_mode("disabled", wandb.Settings()) == "disabled"


def test_wandb_mode_reads_wandb_settings_files(tmp_path):
    """``wandb offline`` writes the mode to W&B's settings file: the mode is then W&B's to apply."""
    with no_tracker_set_up(tmp_path) as env:
        assert wandb_mode(None, wandb_setup.singleton().settings) == "offline"
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "settings").write_text("[default]\nmode = offline\n")
        wandb.teardown()
        assert wandb_mode(None, wandb_setup.singleton().settings) is None
        env.setenv("WANDB_CONFIG_DIR", str(tmp_path / "elsewhere"))
        wandb.teardown()
        assert wandb_mode(None, wandb_setup.singleton().settings) == "offline"


# --- MLflow --------------------------------------------------------------------------------------


def mlflow_run(store: Path) -> Path:
    """The one run folder of a file store: <store>/<experiment id>/<run id>/."""
    runs = [meta.parent for meta in store.glob("*/*/meta.yaml")]
    assert len(runs) == 1, runs
    return runs[0]


def mlflow_params(run: Path) -> dict[str, str]:
    return {
        str(path.relative_to(run / "params")): path.read_text()
        for path in (run / "params").rglob("*")
        if path.is_file()
    }


def mlflow_metric(run: Path, name: str) -> list[float]:
    """A metric's values: one ``timestamp value step`` line each."""
    return [float(line.split()[1]) for line in (run / "metrics" / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def mlflow_job(tmp_path_factory):
    with no_tracker_set_up(tmp_path_factory.mktemp("home")):
        job = run_job(tmp_path_factory.mktemp("run"), *OVERRIDES, "logger=mlflow")
    job.run = mlflow_run(job.dir / "mlruns")
    return job


@pytest.mark.slow
def test_mlflow_writes_a_finished_run_to_a_file_store_in_the_run_folder(mlflow_job):
    # imported once the job has switched MLflow's telemetry off
    from mlflow.entities import RunStatus

    experiment = yaml.safe_load((mlflow_job.run.parent / "meta.yaml").read_text())
    run = yaml.safe_load((mlflow_job.run / "meta.yaml").read_text())
    assert experiment["name"] == "detr-backbone"
    assert RunStatus.to_string(run["status"]) == "FINISHED"


@pytest.mark.slow
def test_mlflow_params_are_the_flattened_composed_config(mlflow_job):
    params = mlflow_params(mlflow_job.run)
    assert set(params) == flat_keys(mlflow_job.config)  # no module hparams beside them
    assert (params["hidden_dim"], params["backbone/name"], params["model/num_queries"]) == ("32", "resnet18", "5")
    assert params["seed"] == "42" and params["data/seed"] == "0"
    assert params["data/scales"] == str(mlflow_job.config["data"]["scales"])
    saved = yaml.safe_load((mlflow_job.run / "artifacts" / "config.yaml").read_text())
    assert saved == mlflow_job.config


@pytest.mark.slow
def test_mlflow_gets_the_metrics_and_the_prediction_grid(mlflow_job):
    (map_50,) = mlflow_metric(mlflow_job.run, "val/map_50")
    assert 0 <= map_50 <= 1
    losses = mlflow_metric(mlflow_job.run, "train/loss")
    assert len(losses) == 2 and all(np.isfinite(loss) and loss > 0 for loss in losses)  # two steps, logged at each
    (grid,) = (mlflow_job.run / "artifacts" / "images").glob("val~predictions+step+*.png")  # beside a .webp thumbnail
    assert np.array_equal(pixels(grid), pixels(mlflow_job.dir / "predictions" / "epoch000.png"))


@pytest.mark.slow
def test_mlflow_honours_a_tracking_uri(tmp_path):
    with no_tracker_set_up(tmp_path / "home") as env:
        env.setenv("MLFLOW_TRACKING_URI", (tmp_path / "shared").as_uri())
        job = run_job(tmp_path / "run", *SMALL, "logger=mlflow", "logger.mlflow.experiment_name=shared")
    assert not (tmp_path / "run" / "mlruns").exists()
    run = mlflow_run(tmp_path / "shared")
    assert yaml.safe_load((run.parent / "meta.yaml").read_text())["name"] == "shared"
    assert mlflow_params(run)["hidden_dim"] == str(job.config["hidden_dim"])


@pytest.mark.slow
def test_each_job_of_a_multirun_keeps_its_own_store(tmp_path):
    """MLflow exports the URI it is set to as MLFLOW_TRACKING_URI: the next job must not take it for the user's."""
    with no_tracker_set_up(tmp_path / "home"):
        for job in ("0", "1"):
            run_job(tmp_path / job, *SMALL, "logger=mlflow", f"seed={job}")
    for job in ("0", "1"):
        assert mlflow_params(mlflow_run(tmp_path / job / "mlruns"))["seed"] == job


def test_tracking_uri_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_tracking_uri(None, tmp_path) == (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert mlflow_tracking_uri(None, tmp_path) == "http://tracking.example:5000"
    assert mlflow_tracking_uri("sqlite:///runs.db", tmp_path) == "sqlite:///runs.db"


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_a_one_line_error_naming_the_extra(tracker, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, tracker, None)  # what importing it finds when it is not installed
    with pytest.raises(
        ValueError, match=rf'^logger={tracker} needs the {tracker} package: pip install -e "\.\[{tracker}\]"$'
    ):
        validated(compose_config(*TINY, f"logger={tracker}"))


def test_a_bad_wandb_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"logger.wandb.mode='onlin' is not one of online, offline, disabled"):
        validated(compose_config(*TINY, "logger=wandb", "logger.wandb.mode=onlin"))


def test_trackers_combine_with_the_other_logger_configs():
    logger = validated(compose_config(*TINY, "logger=[tensorboard,wandb,mlflow]")).logger
    assert logger.csv and logger.tensorboard
    assert logger.wandb.project == logger.mlflow.experiment_name == "detr-backbone"
    assert validated(compose_config(*TINY, "logger=mlflow")).logger.tensorboard is False


@pytest.mark.slow
def test_a_run_resumed_in_its_own_folder_keeps_the_earlier_part_of_metrics_csv(tmp_path):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it instead."""
    import csv

    small = [*SMALL, "callbacks.checkpoint.every_n_train_steps=null"]
    run_job(tmp_path, *small, "trainer.max_epochs=1")
    metrics = tmp_path / "csv" / "metrics.csv"
    with metrics.open(newline="") as file:
        first_part = list(csv.DictReader(file))
    assert {row["epoch"] for row in first_part if row.get("val/map_50")} == {"0"}
    run_job(tmp_path, *small, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    with metrics.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows[: len(first_part)] == first_part
    assert {row["epoch"] for row in rows if row.get("val/map_50")} == {"0", "1"}
    assert {int(row["step"]) for row in rows if row.get("train/loss")} == set(range(8))  # 4 steps an epoch
