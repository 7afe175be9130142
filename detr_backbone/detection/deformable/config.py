"""Deformable DETR's schema (conf/model/deformable_detr*.yaml); its defaults are Deformable-DETR's main.py."""

from __future__ import annotations

from dataclasses import dataclass

from ...validation import require
from ..multiscale.config import MultiScaleHeadConfig


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

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            not self.two_stage or self.with_box_refine,
            "model.two_stage=true needs model.with_box_refine=true (as Deformable-DETR's two-stage checkpoints)",
        )
