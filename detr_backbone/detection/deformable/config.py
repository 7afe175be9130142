"""Deformable DETR's head as a plugin (conf/model/deformable_detr*.yaml): its schema, criterion, levels
and the parameter group of its sampling offsets; defaults are Deformable-DETR's main.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ...param_groups import make_group
from ...validation import require
from ..head import HeadConfig
from ..published import DetectorWeights
from .criterion import FocalSetCriterion, build_deformable_criterion
from .deformable_detr import linear_projection_parameters
from .hugging_face import HUGGING_FACE_DEFORMABLE_DETR, is_hugging_face_state
from .matcher import FOCAL_ALPHA
from .sampling import ATTENTION_IMPLS
from .weights import DeformableArchitecture, official_deformable_weights


@dataclass
class MultiScaleHeadConfig(HeadConfig):
    """What the heads on multi-scale deformable attention share (Deformable DETR, DINO): the levels they read,
    sampling points, the focal loss and the lr of the sampling offsets and reference points."""

    num_feature_levels: int = 4  # the Joiner's levels plus stride-2 convolutions up to this count
    enc_n_points: int = 4  # sampling points per head and level
    dec_n_points: int = 4
    focal_alpha: float = FOCAL_ALPHA
    lr_linear_proj_mult: float = 0.1  # sampling offsets and reference points train at lr times this
    attention_impl: str = "auto"  # the deformable attention core: auto | triton | gather | grid_sample (the reference)

    POSITIVE: ClassVar[tuple[str, ...]] = (
        *HeadConfig.POSITIVE,
        "num_feature_levels",
        "enc_n_points",
        "dec_n_points",
    )
    BUILD_CRITERION: ClassVar[Callable[..., FocalSetCriterion]]  # the head's focal criterion builder

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.focal_alpha < 1, f"model.focal_alpha={self.focal_alpha} must be in (0, 1)")
        require(self.lr_linear_proj_mult > 0, f"model.lr_linear_proj_mult={self.lr_linear_proj_mult} must be > 0")
        require(
            self.attention_impl in ATTENTION_IMPLS,
            f"model.attention_impl={self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}",
        )

    def criterion(self, num_classes: int, num_boxes_reduce: Callable[[Tensor], Tensor]) -> FocalSetCriterion:
        return self.BUILD_CRITERION(
            num_classes,
            **self.costs,
            **self.loss_weights,
            focal_alpha=self.focal_alpha,
            num_boxes_reduce=num_boxes_reduce,
        )

    def backbone_levels(self) -> list[int]:
        """The levels Deformable-DETR's build_backbone takes: layers 2-4, or layer4 alone for one level."""
        return [2, 3, 4] if self.num_feature_levels > 1 else [4]

    def parameter_groups(self, detector: nn.Module, lr: float) -> list[dict]:
        """The sampling offsets and reference points, trained at ``lr * lr_linear_proj_mult``."""
        projections = [parameter for _, parameter in linear_projection_parameters(detector)]
        return make_group("linear_projection", projections, lr * self.lr_linear_proj_mult)


@dataclass
class DeformableDetrConfig(MultiScaleHeadConfig):
    """Deformable DETR: multi-scale deformable attention on the Joiner's levels, a sigmoid head and focal loss."""

    _target_: str = "detr_backbone.detection.deformable.build_deformable_detr"
    num_queries: int = 300
    dim_feedforward: int = 1024
    cost_class: float = 2.0  # the focal class cost
    loss_ce: float = 2.0  # the sigmoid focal loss
    with_box_refine: bool = False  # each decoder layer refines the previous one's boxes
    two_stage: bool = False  # queries from the encoder's best proposals (needs with_box_refine)

    ARCHITECTURE: ClassVar[type[DeformableArchitecture]] = DeformableArchitecture
    BUILD_CRITERION = staticmethod(build_deformable_criterion)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            not self.two_stage or self.with_box_refine,
            "model.two_stage=true needs model.with_box_refine=true (as Deformable-DETR's two-stage checkpoints)",
        )

    @classmethod
    def published_weights(cls, content: Any, path: str | os.PathLike) -> DetectorWeights | None:
        if isinstance(content, dict) and is_hugging_face_state(content):
            return HUGGING_FACE_DEFORMABLE_DETR.read_file(content, path)
        return official_deformable_weights(content, path)

    @classmethod
    def published_folder(cls, folder: str | os.PathLike) -> DetectorWeights | None:
        return HUGGING_FACE_DEFORMABLE_DETR.read_folder(folder)
