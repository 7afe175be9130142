"""The schema the real-time heads share (RT-DETRv2, D-FINE): hybrid encoder, query selection, decoder, denoising
and varifocal training. Its defaults are RT-DETRv2-R50's (lyuwenyu/RT-DETR,
rtdetrv2_pytorch/configs/rtdetrv2/include/rtdetrv2_r50vd.yml), which D-FINE keeps where it does not differ."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from torch import nn

from ...image_input import InputConfig
from ...param_groups import make_group
from ...validation import require
from ..head import TransformerHeadConfig
from ..multiscale.config import levels_read
from ..multiscale.matcher import FOCAL_ALPHA
from ..multiscale.sampling import ATTENTION_IMPLS

CROSS_ATTN_METHODS = ("default", "discrete")
QUERY_SELECT_METHODS = ("default", "agnostic", "one2many")
CLASS_LOSSES = ("vfl", "mal")  # varifocal | DEIM's matchability-aware (realtime.criterion)


@dataclass
class RealTimeHeadConfig(TransformerHeadConfig):
    """A hybrid encoder (one transformer layer on the deepest level, then CNN fusion of all levels), queries
    selected from the encoder's top-k, a deformable decoder with denoising, trained with the varifocal loss.
    ``enc_layers`` counts the transformer layers on the deepest level."""

    num_queries: int = 300
    enc_layers: int = 1
    dec_layers: int = 6
    dim_feedforward: int = 1024  # the decoder's, and the encoder's unless enc_dim_feedforward is set
    enc_dim_feedforward: Optional[int] = (
        None  # the encoder's feed-forward width; null: dim_feedforward (D-FINE-X: 2048)
    )
    dropout: float = 0.0
    num_feature_levels: int = (
        3  # the backbone's last levels read, each fused by the encoder and attended by the decoder
    )
    expansion: float = 1.0  # the fusion blocks' hidden width, times hidden_dim (R18: 0.5)
    depth_mult: float = 1.0  # the fusion blocks' RepVGG blocks: round(3 * depth_mult)
    num_points: int = 4  # the decoder's sampling points per head and level
    cross_attn_method: str = "default"  # default (bilinear) | discrete (nearest value: exports without GridSample)
    query_select_method: str = "default"  # default (best class) | agnostic (one objectness score) | one2many
    eval_idx: int = -1  # the decoder layer whose boxes are the detections in evaluation; later layers are skipped
    dn_number: int = 100  # positive denoising queries a batch (as many negatives); 0: no denoising
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 1.0
    num_select: int = 300  # detections kept per image: the best (query, class) pairs
    attention_impl: str = "auto"  # the deformable attention core (see MultiScaleHeadConfig)
    cost_class: float = 2.0  # the focal class cost
    focal_alpha: float = FOCAL_ALPHA  # the matcher's focal cost
    vfl_alpha: float = 0.75  # the varifocal loss: alpha p^gamma weighs the negatives
    vfl_gamma: float = 2.0
    class_loss: str = "vfl"  # vfl (varifocal) | mal (DEIM's matchability-aware loss)
    mal_gamma: float = 1.5  # MAL: targets IoU^gamma, negatives weighed by p^gamma
    mal_alpha: Optional[float] = None  # MAL: a factor on the negatives' weight; null: none, as DEIM
    loss_ce: float = 1.0  # the class loss's weight
    # RT-DETR takes pixels / 255 without mean / std, evaluated on a square (the aspect ratio not kept)
    input: InputConfig = field(default_factory=lambda: InputConfig(normalize=False, resize="square"))

    POSITIVE: ClassVar[tuple[str, ...]] = (
        *TransformerHeadConfig.POSITIVE,
        "num_feature_levels",
        "num_points",
        "expansion",
        "depth_mult",
        "num_select",
    )
    TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (
        *TransformerHeadConfig.TRAINING_FIELDS,
        "focal_alpha",
        "vfl_alpha",
        "vfl_gamma",
        "class_loss",
        "mal_gamma",
        "mal_alpha",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, valid in (
            ("cross_attn_method", self.cross_attn_method, CROSS_ATTN_METHODS),
            ("query_select_method", self.query_select_method, QUERY_SELECT_METHODS),
            ("attention_impl", self.attention_impl, ATTENTION_IMPLS),
            ("class_loss", self.class_loss, CLASS_LOSSES),
        ):
            require(value in valid, f"model.{name}={value!r} is not one of {', '.join(valid)}")
        require(
            -self.dec_layers <= self.eval_idx < self.dec_layers,
            f"model.eval_idx={self.eval_idx} must index one of the {self.dec_layers} decoder layers",
        )
        require(
            self.num_feature_levels <= 3,
            f"model.num_feature_levels={self.num_feature_levels}: the hybrid encoder reads at most the backbone's last three levels",
        )
        require(self.dn_number >= 0, f"model.dn_number={self.dn_number} must be >= 0")
        require(0 < self.focal_alpha < 1, f"model.focal_alpha={self.focal_alpha} must be in (0, 1)")
        require(self.vfl_alpha > 0, f"model.vfl_alpha={self.vfl_alpha} must be > 0")
        require(self.vfl_gamma >= 0, f"model.vfl_gamma={self.vfl_gamma} must be >= 0")
        require(self.mal_gamma >= 0, f"model.mal_gamma={self.mal_gamma} must be >= 0")
        require(self.mal_alpha is None or self.mal_alpha > 0, f"model.mal_alpha={self.mal_alpha} must be > 0 or null")

    @property
    def class_loss_focus(self) -> tuple[float | None, float]:
        """(alpha, gamma) of the class loss ``class_loss`` picks."""
        if self.class_loss == "mal":
            return self.mal_alpha, self.mal_gamma
        return self.vfl_alpha, self.vfl_gamma

    def backbone_levels(self) -> list[int]:
        return levels_read(self.num_feature_levels)

    def parameter_groups(self, detector: nn.Module, lr: float) -> list[dict]:
        """The encoder's and decoder's norms (BatchNorm and LayerNorm) without weight decay, as RT-DETRv2 and D-FINE
        train."""
        norms = [
            parameter
            for name, module in detector.named_modules()
            if not name.startswith("backbone.") and isinstance(module, (nn.BatchNorm2d, nn.LayerNorm))
            for parameter in module.parameters(recurse=False)
        ]
        return [{**group, "weight_decay": 0.0} for group in make_group("norms", norms, lr)]
