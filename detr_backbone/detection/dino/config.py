"""DINO's schema (conf/model/dino*.yaml); its defaults are DINO-4scale's (IDEA-Research/DINO,
config/DINO/DINO_4scale.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...validation import require
from ..multiscale.config import MultiScaleHeadConfig


@dataclass
class DinoConfig(MultiScaleHeadConfig):
    """DINO: Deformable DETR's attention with mixed query selection, look-forward-twice refinement and
    contrastive denoising training."""

    _target_: str = "detr_backbone.detection.dino.build_dino"
    num_queries: int = 900
    dim_feedforward: int = 2048
    dropout: float = 0.0
    cost_class: float = 2.0  # the focal class cost
    loss_ce: float = 1.0  # the sigmoid focal loss
    dn_number: int = 100  # positive denoising queries a batch (as many negatives); 0: no denoising
    dn_label_noise_ratio: float = 0.5  # a denoising query's class is replaced with probability half this
    dn_box_noise_scale: float = 0.4  # box edges move by up to this times half the box's size (negatives: 1-2x)
    num_select: int = 300  # detections kept per image: the best (query, class) pairs (DINO's PostProcess)

    POSITIVE: ClassVar[tuple[str, ...]] = (*MultiScaleHeadConfig.POSITIVE, "num_select")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.dn_number >= 0, f"model.dn_number={self.dn_number} must be >= 0")
        require(
            0 <= self.dn_label_noise_ratio <= 1,
            f"model.dn_label_noise_ratio={self.dn_label_noise_ratio} must be in [0, 1]",
        )
        require(self.dn_box_noise_scale >= 0, f"model.dn_box_noise_scale={self.dn_box_noise_scale} must be >= 0")
