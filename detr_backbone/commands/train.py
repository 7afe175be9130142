"""Train a detector around the configured Joiner (``detr-backbone train``, ``python train.py``).

    detr-backbone train                                       # the CPU default job: learns the shapes data
    detr-backbone train backbone=resnet101_gn dilation=true
    detr-backbone train -m backbone=resnet50,resnet101 position=sine,learned
    detr-backbone train ckpt_path=outputs/<run>/checkpoints/last.ckpt     # resume, in the run's own folder
    detr-backbone train --config-dir my_configs experiment=my_experiment  # configs of your own, found by name
    detr-backbone train -m hparams_search=detr_optuna                     # Optuna search
    detr-backbone train debug=fdr                                         # a debug preset

Arguments are Hydra's: ``key=value`` overrides, ``-m``, ``--config-dir``, ``--cfg job``, ``--help``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, version
from hydra._internal.utils import _run_hydra, get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ..data.images import BadImageError
from ..file_writes import DiskFullError
from ..training import Job, register_configs, validated
from ..training.callbacks import NonFiniteLossError
from ..training.callbacks.bad_samples import BadSampleLimitError
from ..training.callbacks.preemption import Preempted
from ..training.objective import MetricNotLoggedError
from ..training.resume import resume_arguments
from ..weights import CheckpointMismatchError
from .cli import CONF_PATH, configs, one_line, reported, split_config_dir, user_config_dir


@contextmanager
def ended_in_one_line(*errors: type[Exception]) -> Iterator[None]:
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


def run(cfg: DictConfig) -> float | None:
    """One job of Hydra's: the composed config validated, built and trained in the job's folder."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with ended_in_one_line(ValueError, FileNotFoundError, CheckpointMismatchError):
        job = Job(validated(cfg, run_dir), run_dir, HydraConfig.get().overrides.task)
    with ended_in_one_line(NonFiniteLossError, MetricNotLoggedError, DiskFullError, BadImageError, BadSampleLimitError):
        try:
            return job.run()
        except Preempted as preempted:  # not a failure: the run can resume; in a sweep too, the machine is going away
            print(preempted, file=sys.stderr)
            raise SystemExit(preempted.exit_status) from None


def check_resume(arguments: Sequence[str]) -> None:
    """A resume's config composed and checked against its checkpoint before Hydra writes it into the run's
    own folder, so that a refused resume leaves that folder as it was."""
    config_dir, rest = split_config_dir(arguments)
    overrides = [argument for argument in rest if "=" in argument and not argument.startswith(("-", "hydra."))]
    with configs(config_dir, "train"):
        validated(compose(config_name="config", overrides=overrides))


def main(argv: Sequence[str]) -> None:
    """Hydra's command line on the package's configs. ``sys.argv`` is left as it is: Lightning's DDP launcher
    starts the other ranks with the same command line, which then settles the same resume."""
    register_configs()
    with reported():
        config_dir, _ = split_config_dir(argv)
        if config_dir is not None:
            user_config_dir(config_dir)  # one line for a missing folder, as the other commands give
        arguments = resume_arguments(argv)
        if arguments != list(argv):
            check_resume(arguments)
    version.setbase("1.3")  # what hydra.main(version_base="1.3") sets: the job keeps the caller's working directory
    parser = get_args_parser()
    # hydra.main without its sys.argv: the arguments may carry a resumed run's saved overrides
    _run_hydra(
        args=parser.parse_args(arguments),
        args_parser=parser,
        task_function=run,
        config_path=CONF_PATH,
        config_name="config",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
