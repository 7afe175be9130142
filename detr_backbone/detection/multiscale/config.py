"""What the heads on multi-scale deformable attention share in their schema (Deformable DETR, DINO, ...): the
levels they read, sampling points, the focal loss and the lr of the sampling offsets and reference points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ...param_groups import make_group
from ...validation import require
from ..head import TransformerHeadConfig
from .levels import linear_projection_parameters
from .matcher import FOCAL_ALPHA
from .sampling import ATTENTION_IMPLS


def levels_read(num_feature_levels: int) -> list[int]:
    """The backbone layers a multi-scale head reads: layers 2-4 (strides 8-32), or layer4 alone for one level;
    for two levels, layers 2-3 (the stride-8 and -16 maps of small images; the body stops after layer3)."""
    return {1: [4], 2: [2, 3]}.get(num_feature_levels, [2, 3, 4])


@dataclass
class MultiScaleHeadConfig(TransformerHeadConfig):
    """What the heads on multi-scale deformable attention share (Deformable DETR, DINO): the levels they read,
    sampling points, the focal loss and the lr of the sampling offsets and reference points."""

    num_feature_levels: int = 4  # the Joiner's levels plus stride-2 convolutions up to this count
    enc_n_points: int = 4  # sampling points per head and level
    dec_n_points: int = 4
    focal_alpha: float = FOCAL_ALPHA
    lr_linear_proj_mult: float = 0.1  # sampling offsets and reference points train at lr times this
    # the deformable attention core: auto (grid_sample while exporting; triton on CUDA; else gather from 2^20 corner
    # reads a call, grid_sample below) | triton | gather | grid_sample (the reference)
    attention_impl: str = "auto"

    POSITIVE: ClassVar[tuple[str, ...]] = (
        *TransformerHeadConfig.POSITIVE,
        "num_feature_levels",
        "enc_n_points",
        "dec_n_points",
    )
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (
        *TransformerHeadConfig.TRAINING_FIELDS,
        "focal_alpha",
        "lr_linear_proj_mult",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.focal_alpha < 1, f"model.focal_alpha={self.focal_alpha} must be in (0, 1)")
        require(self.lr_linear_proj_mult > 0, f"model.lr_linear_proj_mult={self.lr_linear_proj_mult} must be > 0")
        require(
            self.attention_impl in ATTENTION_IMPLS,
            f"model.attention_impl={self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}",
        )

    def backbone_levels(self) -> list[int]:
        return levels_read(self.num_feature_levels)

    def parameter_groups(self, detector: nn.Module, lr: float) -> list[dict]:
        """The sampling offsets and reference points, trained at ``lr * lr_linear_proj_mult``."""
        projections = [parameter for _, parameter in linear_projection_parameters(detector)]
        return make_group("linear_projection", projections, lr * self.lr_linear_proj_mult)
