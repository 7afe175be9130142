"""Train a DETR detector around the configured Joiner.

python train.py                                      # the CPU default: learns the shapes data
python train.py backbone=resnet101_gn dilation=true
python train.py -m backbone=resnet50,resnet101 position=sine,learned
python train.py ckpt_path=outputs/<run>/checkpoints/last.ckpt    # resume
python train.py -m hparams_search=detr_optuna                    # Optuna search, conf/hparams_search/
python train.py debug=fdr                                        # a debug preset, conf/debug/
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from detr_backbone.commands.cli import one_line
from detr_backbone.data.images import BadImageError
from detr_backbone.file_writes import DiskFullError
from detr_backbone.training import Job, register_configs, validated
from detr_backbone.training.callbacks import NonFiniteLossError
from detr_backbone.training.callbacks.bad_samples import BadSampleLimitError
from detr_backbone.training.callbacks.preemption import Preempted
from detr_backbone.training.objective import MetricNotLoggedError
from detr_backbone.weights import CheckpointMismatchError

register_configs()


@contextmanager
def reported(*errors: type[Exception]) -> Iterator[None]:
    """A single run ends on one of ``errors`` with its message on one line.

    In a multirun the error is re-raised as it is: Hydra's job runner catches an Exception as that job's
    failure and the sweep goes on (the Optuna sweeper records a failed trial), whereas a SystemExit is
    no Exception and would end the whole sweep.
    """
    try:
        yield
    except errors as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        raise SystemExit(one_line(error)) from None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported(ValueError, FileNotFoundError, CheckpointMismatchError):
        job = Job(validated(cfg, run_dir), run_dir)
    with reported(NonFiniteLossError, MetricNotLoggedError, DiskFullError, BadImageError, BadSampleLimitError):
        try:
            return job.run()
        except Preempted as preempted:  # not a failure: the run can resume; in a sweep too, the machine is going away
            print(preempted, file=sys.stderr)
            raise SystemExit(preempted.exit_status) from None


if __name__ == "__main__":
    main()
