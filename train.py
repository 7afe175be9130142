"""Build the configured Joiner and run it on a padded batch.

    python train.py backbone=resnet101_gn dilation=true
    python train.py -m backbone=resnet50,resnet101 position=sine,learned
"""
from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig

from detr_backbone import CheckpointMismatchError, build_backbone, nested_tensor_from_tensor_list, register_configs
from detr_backbone.summary import describe

log = logging.getLogger(__name__)
register_configs()


def sample_batch(batch_size: int, image_size: int, generator: torch.Generator):
    """Images of different sizes, as a detection batch has, so the padding mask is real."""
    sizes = [(image_size - 32 * (i % 3), image_size - 48 * (i % 2)) for i in range(batch_size)]
    return nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=generator) for h, w in sizes])


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    try:
        joiner = build_backbone(cfg)
    except (ValueError, CheckpointMismatchError) as error:
        raise SystemExit(f"error: {error}") from None
    images = sample_batch(cfg.batch_size, cfg.image_size, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        features, positions = joiner.eval()(images)
    log.info("\n%s", describe(joiner, images, features, positions))


if __name__ == "__main__":
    main()
