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

from detr_backbone.train_config import register_configs
from detr_backbone.training import Job, validated
from detr_backbone.weights import CheckpointMismatchError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        job = Job(validated(cfg), Path(HydraConfig.get().runtime.output_dir))
    except (ValueError, CheckpointMismatchError) as error:
        raise SystemExit(f"error: {error}") from None
    return job.run()


if __name__ == "__main__":
    main()
