"""What weights of a head on multi-scale deformable attention show of the network (Deformable-DETR's and DINO's
names): the fields both describe, read from a state dict's keys and shapes; each head's description adds its own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ...config import BackboneConfig
from ..building import DetectorConfig
from ..published import backbone_of_state, configured_backbone, count_layers, published_backbone
from .config import MultiScaleHeadConfig

PUBLISHED_HEADS = 8  # Deformable-DETR's and DINO's attention heads: the shapes hold heads x points, not each


@dataclass(frozen=True)
class MultiScaleArchitecture:
    """What weights of a head on multi-scale deformable attention show of the network; None where they do not.
    Subclasses (a head's) add their own fields and build their detector."""

    backbone_kind: str | None = None
    backbone_name: str | None = None
    levels: tuple[int, ...] | None = None  # the backbone stages read, 1-based
    dilation: bool | None = None
    hidden_dim: int | None = None
    num_feature_levels: int | None = None
    enc_layers: int | None = None
    dec_layers: int | None = None
    dim_feedforward: int | None = None
    nheads: int | None = None
    enc_n_points: int | None = None
    dec_n_points: int | None = None
    num_queries: int | None = None

    NO_OBJECT_ROWS: ClassVar[int] = 0
    QUERIES: ClassVar[str] = "query_embed.weight"
    CLASS_TABLES: ClassVar[Mapping[str, int]] = {}
    # num_queries is absent: a checkpoint may have more queries than the run keeps
    OVERRIDES: ClassVar[Mapping[str, str]] = {
        "backbone_kind": "backbone._target_",
        "backbone_name": "backbone.name",
        "levels": "backbone.levels",
        "dilation": "dilation",
        "hidden_dim": "hidden_dim",
        "num_feature_levels": "model.num_feature_levels",
        "enc_layers": "model.enc_layers",
        "dec_layers": "model.dec_layers",
        "dim_feedforward": "model.dim_feedforward",
        "nheads": "model.nheads",
        "enc_n_points": "model.enc_n_points",
        "dec_n_points": "model.dec_n_points",
    }
    UNSEEN_IN_SHAPES: ClassVar[tuple[str, ...]] = ("dilation", "nheads", "enc_n_points", "dec_n_points")

    def __str__(self) -> str:
        return ", ".join(self.described())

    def described(self) -> list[str]:
        return [
            self.backbone_name or "unknown backbone",
            f"hidden_dim {self.hidden_dim}",
            f"{self.num_feature_levels} levels",
            f"{self.enc_layers} encoder + {self.dec_layers} decoder layers",
            f"{self.num_queries} queries" if self.num_queries is not None else "queries from proposals",
        ]

    @classmethod
    def configured(cls, config: DetectorConfig) -> MultiScaleArchitecture:
        return cls(**cls.configured_fields(config))

    @classmethod
    def configured_fields(cls, config: DetectorConfig) -> dict[str, Any]:
        head = config.head
        levels = getattr(config.joiner.backbone, "levels", None)
        return {
            **configured_backbone(config),
            "levels": None if levels is None else tuple(levels),
            "hidden_dim": config.joiner.hidden_dim,
            "num_feature_levels": head.num_feature_levels,
            "enc_layers": head.enc_layers,
            "dec_layers": head.dec_layers,
            "dim_feedforward": head.dim_feedforward,
            "nheads": head.nheads,
            "enc_n_points": head.enc_n_points,
            "dec_n_points": head.dec_n_points,
            "num_queries": head.num_queries,
        }

    def backbone_config(self, dilation: bool | None) -> BackboneConfig:
        dilated = bool(self.dilation if dilation is None else dilation)
        return published_backbone(
            self.backbone_kind, self.backbone_name, dilated, levels=list(self.levels or (2, 3, 4))
        )

    def head_fields(self, defaults: MultiScaleHeadConfig) -> dict[str, Any]:
        """The head's fields these weights decide (the schema's ``defaults`` where they do not), dropout 0."""
        return {
            "num_queries": self.num_queries or defaults.num_queries,
            "enc_layers": self.enc_layers,
            "dec_layers": self.dec_layers,
            "nheads": self.nheads or defaults.nheads,
            "dim_feedforward": self.dim_feedforward or defaults.dim_feedforward,
            "num_feature_levels": self.num_feature_levels,
            "enc_n_points": self.enc_n_points or defaults.enc_n_points,
            "dec_n_points": self.dec_n_points or defaults.dec_n_points,
            "dropout": 0.0,
        }


def points_per_head(state: Mapping[str, Tensor], side: str, levels: int) -> int | None:
    """Sampling points per head and level of the encoder or decoder, if the published head count divides them."""
    weights = state.get(
        f"transformer.{side}.layers.0.{'self_attn' if side == 'encoder' else 'cross_attn'}.attention_weights.weight"
    )
    if weights is None or weights.shape[0] % (levels * PUBLISHED_HEADS):
        return None
    return weights.shape[0] // (levels * PUBLISHED_HEADS)


def multi_scale_fields(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the keys and shapes of a multi-scale head's state dict (Deformable-DETR's and DINO's names) show."""
    level_embed = state["transformer.level_embed"]
    num_levels = level_embed.shape[0]
    backbone_levels = sum(
        1
        for key, value in state.items()
        if key.startswith("input_proj.") and key.endswith(".0.weight") and value.shape[-1] == 1
    )
    kind, name, _ = backbone_of_state(state)
    enc_points, dec_points = (
        points_per_head(state, "encoder", num_levels),
        points_per_head(state, "decoder", num_levels),
    )
    return {
        "backbone_kind": kind,
        "backbone_name": name,
        "levels": tuple(range(5 - backbone_levels, 5)),
        "hidden_dim": level_embed.shape[1],
        "num_feature_levels": num_levels,
        "enc_layers": count_layers(state, "transformer.encoder.layers."),
        "dec_layers": count_layers(state, "transformer.decoder.layers."),
        "dim_feedforward": next((v.shape[0] for k, v in state.items() if k.endswith(".linear1.weight")), None),
        "nheads": PUBLISHED_HEADS if enc_points and dec_points else None,
        "enc_n_points": enc_points,
        "dec_n_points": dec_points,
    }
