"""Train a DETR detector around the configured Joiner.

    python train.py                                      # the CPU default: learns the shapes data
    python train.py backbone=resnet101_gn dilation=true
    python train.py -m backbone=resnet50,resnet101 position=sine,learned
    python train.py ckpt_path=outputs/<run>/checkpoints/last.ckpt    # resume
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detr_backbone.training import Job, register_configs, validated
from detr_backbone.training.callbacks import NonFiniteLossError
from detr_backbone.weights import CheckpointMismatchError

register_configs()


def one_line(error: Exception) -> str:
    """``error: <message>`` on one line (a checkpoint mismatch lists its keys on several)."""
    text = "error:"
    for line in filter(None, (line.strip() for line in str(error).splitlines())):
        text += (" " if text.endswith(":") else "; ") + line
    return text


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        job = Job(validated(cfg), Path(HydraConfig.get().runtime.output_dir))
    except (ValueError, FileNotFoundError, CheckpointMismatchError) as error:
        raise SystemExit(one_line(error)) from None
    try:
        return job.run()
    except NonFiniteLossError as error:
        raise SystemExit(one_line(error)) from None


if __name__ == "__main__":
    main()
