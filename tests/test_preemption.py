"""Preemption: SIGTERM or SLURM's warning signal, sent to a training process mid-epoch, ends it with
last.ckpt at that very step; the resumed (or requeued) run goes on from there to an uninterrupted run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detr_backbone.data.shapes import ShapesDataset
from detr_backbone.training.callbacks.preemption import Preempted
from detr_backbone.training.job import Job, validated

from .jobs import ROOT, SMALL, compose_config

# 6 images in batches of 2: 3 steps per epoch, two epochs. last.ckpt only after each epoch (no step interval),
# so a resume from step 5 can only come from the checkpoint the signal made.
PREEMPTIBLE = (*SMALL, "data.train_size=6", "trainer.max_epochs=2", "callbacks.checkpoint.every_n_train_steps=null")
STOP_AT_SAMPLE = 8  # epoch 1, the first sample of its second batch: the signal arrives while step 5 loads its data

# Runs train.py; its training data waits at the n-th sample, after touching a marker file, until a release
# file appears, so that the signal reaches the process in the middle of a known step.
WAITING_TRAIN = """
import runpy, sys, time
from pathlib import Path

from detr_backbone.data.shapes import ShapesDataset

marker, release, wait_at, train_py = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fetched = 0
original = ShapesDataset.__getitem__

def waiting_getitem(self, index):
    global fetched
    if self.split == "train":
        if fetched == wait_at:
            marker.touch()
            while not release.exists():
                time.sleep(0.02)
        fetched += 1
    return original(self, index)

ShapesDataset.__getitem__ = waiting_getitem
sys.argv = [train_py, *sys.argv[5:]]
runpy.run_path(train_py, run_name="__main__")
"""


def assert_same_weights(expected: Job, actual: Job) -> None:
    assert actual.trainer.global_step == expected.trainer.global_step == 6
    for (name, a), b in zip(expected.module.state_dict().items(), actual.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def checkpoint_step(path: Path) -> tuple[int, int, list]:
    checkpoint = torch.load(path, weights_only=True)
    return (
        checkpoint["global_step"],
        checkpoint["epoch"],
        checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"],
    )


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Job:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread: on two shared cores, a second thread only waits
    job = Job(validated(compose_config(*PREEMPTIBLE)), tmp_path_factory.mktemp("uninterrupted"))
    job.run()
    torch.set_num_threads(threads)
    return job


def test_sigterm_to_train_py_writes_last_ckpt_at_the_current_step_and_ckpt_path_last_resumes_there(tmp_path, request):
    marker, release, run_dir = tmp_path / "waiting", tmp_path / "release", tmp_path / "preempted"
    (tmp_path / "waiting_train.py").write_text(WAITING_TRAIN)
    process = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "waiting_train.py"),
            str(marker),
            str(release),
            str(STOP_AT_SAMPLE),
            str(ROOT / "train.py"),
            *PREEMPTIBLE,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    uninterrupted = request.getfixturevalue("uninterrupted")  # trains while the process starts
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.stderr.read() if process.poll() is not None else "the run never reached the sample"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last)[:2] == (3, 0)  # the periodic one, from the end of epoch 0
    os.kill(process.pid, signal.SIGTERM)
    release.touch()
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"stopped by SIGTERM at global step 5 (epoch 1, after 2 of its 3 batches); {last} holds that step; "
        f"resume with ckpt_path={last} (or hydra.run.dir=<this run> ckpt_path=last)"
    )
    assert checkpoint_step(last) == (5, 1, [{"batches": 2, "batch_size": 2, "replicas": 1}])
    assert not [path.name for path in last.parent.iterdir() if path.name.startswith(".")]  # no temporary file

    # ckpt_path=last, in the same run folder: the newest last.ckpt there
    resumed = Job(validated(compose_config(*PREEMPTIBLE, "ckpt_path=last"), run_dir), run_dir)
    assert resumed.cfg.ckpt_path == str(last)
    resumed.run()
    assert_same_weights(uninterrupted, resumed)
    # resumed in place, the folder keeps the best epoch checkpoint and last.ckpt, nothing else
    assert len(list(last.parent.glob("epoch*.ckpt"))) == 1 and len(list(last.parent.iterdir())) == 2


def send_at_sample(monkeypatch, signal_number: int, at: int) -> None:
    """The process sends itself ``signal_number`` while it loads training sample number ``at``."""
    fetched = 0
    original = ShapesDataset.__getitem__

    def signalling_getitem(self, index):
        nonlocal fetched
        if self.split == "train":
            if fetched == at:
                os.kill(os.getpid(), signal_number)
            fetched += 1
        return original(self, index)

    monkeypatch.setattr(ShapesDataset, "__getitem__", signalling_getitem)


@pytest.fixture
def slurm_job(tmp_path, monkeypatch) -> Path:
    """A SLURM job's environment, with an ``scontrol`` that records its arguments in the returned file."""
    calls = tmp_path / "scontrol_calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "detr",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "node1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    return calls


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SLURM's warning signal is POSIX")
def test_slurm_warning_signal_requeues_the_job_which_resumes_at_the_step(
    tmp_path, monkeypatch, slurm_job, uninterrupted
):
    run_dir = (
        tmp_path / "slurm-4242"
    )  # one folder for every start of the job, e.g. hydra.run.dir=outputs/slurm-$SLURM_JOB_ID
    job = Job(validated(compose_config(*PREEMPTIBLE), run_dir), run_dir)
    before = signal.getsignal(signal.SIGUSR1)  # SIG_DFL, unless something earlier in this process set one
    with monkeypatch.context() as patch, pytest.raises(Preempted) as stopped:
        send_at_sample(patch, signal.SIGUSR1, STOP_AT_SAMPLE)
        job.run()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert str(stopped.value).endswith(f"{last} holds that step; requeued SLURM job 4242, which resumes from it")
    assert stopped.value.exit_status == 128 + signal.SIGUSR1
    assert slurm_job.read_text() == "requeue 4242\n"
    assert checkpoint_step(last) == (5, 1, [{"batches": 2, "batch_size": 2, "replicas": 1}])
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler lives only as long as the fit

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued job
    requeued = Job(validated(compose_config(*PREEMPTIBLE), run_dir), run_dir)
    assert requeued.cfg.ckpt_path == str(last)
    requeued.run()
    assert_same_weights(uninterrupted, requeued)
