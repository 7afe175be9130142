"""D-FINE's schema (conf/model/dfine*.yaml); its defaults are D-FINE-L's (Peterande/D-FINE,
configs/dfine/include/dfine_hgnetv2.yml), the other sizes are presets of ``experiment=dfine_hgnetv2_*_coco``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...validation import require
from ..realtime.config import RealTimeHeadConfig

ACTIVATIONS = ("relu", "silu")  # D-FINE's decoder uses ReLU, DEIM's SiLU


@dataclass
class DFineConfig(RealTimeHeadConfig):
    """D-FINE: the real-time heads' hybrid encoder and query selection, a decoder whose layers refine each box
    edge as a distribution over ``reg_max + 1`` bins (FDR), a location-quality term in the scores, and
    training with fine-grained localization (FGL) and decoupled distillation (DDF) losses."""

    _target_: str = "detr_backbone.detection.dfine.build_dfine"
    # sampling points per head of each level read (one number per level; D-FINE-N: [6, 6])
    num_points: list[int] = field(default_factory=lambda: [3, 6, 3])
    reg_max: int = 32  # bins per edge: reg_max + 1
    reg_scale: float = 4.0  # the weighting function's curvature and reach (D-FINE-X: 8)
    layer_scale: float = 1.0  # the width of the decoder layers after eval_idx, times hidden_dim
    activation: str = "relu"  # the decoder's feed-forward blocks and quality heads (DEIM: silu)
    mlp_activation: str = "relu"  # its box heads and positional MLP (DEIM: silu)
    loss_fgl: float = 0.15  # fine-grained localization loss's weight
    loss_ddf: float = 1.5  # decoupled distillation's weight
    ddf_temperature: float = 5.0  # the distillation's softmax temperature

    POSITIVE: ClassVar[tuple[str, ...]] = (
        *(name for name in RealTimeHeadConfig.POSITIVE if name != "num_points"),
        "reg_max",
        "reg_scale",
        "layer_scale",
        "ddf_temperature",
    )
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (
        *RealTimeHeadConfig.TRAINING_FIELDS,
        "loss_fgl",
        "loss_ddf",
        "ddf_temperature",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        points = list(self.num_points)
        require(
            len(points) == self.num_feature_levels and all(count > 0 for count in points),
            f"model.num_points={points} must give a positive count for each of the "
            f"model.num_feature_levels={self.num_feature_levels} levels",
        )
        require(
            self.reg_max >= 4 and self.reg_max % 2 == 0,
            f"model.reg_max={self.reg_max} must be an even number >= 4 (bins symmetric around a middle 0)",
        )
        for name in ("activation", "mlp_activation"):
            value = getattr(self, name)
            require(value in ACTIVATIONS, f"model.{name}={value!r} is not one of {', '.join(ACTIVATIONS)}")

    @property
    def loss_weights(self) -> dict[str, float]:
        return {**super().loss_weights, "loss_fgl": self.loss_fgl, "loss_ddf": self.loss_ddf}
