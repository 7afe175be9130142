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
from ..training.callbacks.saved_config import CommandLine
from ..training.objective import MetricNotLoggedError
from ..training.resume import resume_command_line
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
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    user_folders = [source.path for source in hydra.runtime.config_sources if source.provider == "command-line"]
    command_line = CommandLine(
        tuple(hydra.overrides.task), user_folders[0].removeprefix("file://") if user_folders else None
    )
    with ended_in_one_line(ValueError, FileNotFoundError, CheckpointMismatchError):
        job = Job(validated(cfg, run_dir), run_dir, command_line)
    with ended_in_one_line(NonFiniteLossError, MetricNotLoggedError, DiskFullError, BadImageError, BadSampleLimitError):
        try:
            return job.run()
        except Preempted as preempted:  # not a failure: the run can resume; in a sweep too, the machine is going away
            print(preempted, file=sys.stderr)
            raise SystemExit(preempted.exit_status) from None


def check_resume(command_line: CommandLine) -> None:
    """A resume's config composed and checked against its checkpoint before Hydra writes it into the run's
    own folder, so that a refused resume leaves that folder as it was."""
    overrides = [o for o in command_line.overrides if "=" in o and not o.startswith(("-", "hydra."))]
    with configs(command_line.config_dir, "train"):
        validated(compose(config_name="config", overrides=overrides))


def main(argv: Sequence[str]) -> None:
    """Hydra's command line on the package's configs. ``sys.argv`` is left as it is: Lightning's DDP launcher
    starts the other ranks with the same command line, which then settles the same resume."""
    register_configs()
    with reported():
        config_dir, overrides = split_config_dir(argv)
        given = CommandLine(tuple(overrides), config_dir and str(user_config_dir(config_dir)))
        command_line = resume_command_line(given)
        if command_line != given:
            check_resume(command_line)
    version.setbase("1.3")  # what hydra.main(version_base="1.3") sets: the job keeps the caller's working directory
    parser = get_args_parser()
    folder = ["--config-dir", command_line.config_dir] if command_line.config_dir else []
    # hydra.main without its sys.argv: the arguments may carry a resumed run's saved overrides
    _run_hydra(
        args=parser.parse_args([*folder, *command_line.overrides]),
        args_parser=parser,
        task_function=run,
        config_path=CONF_PATH,
        config_name="config",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
