"""Deformable DETR's published layout: Deformable-DETR's own checkpoints, whose module names are ours.

``{"model": state, "args": Namespace(...), ...}`` with ``backbone.0.body.*``, ``transformer.level_embed``,
``input_proj.N``, ``class_embed.N`` / ``bbox_embed.N`` (one per decoder layer, + one with two-stage),
``query_embed`` (not with two-stage), ``transformer.decoder.bbox_embed.N`` with box refinement and
``transformer.enc_output`` with two-stage. What the shapes show is read here; dilation and how the
sampling points split into heads and points per head are not in them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from ...config import BACKBONE_TARGETS, POSITION_TARGETS, BackboneConfig, JoinerConfig, PositionConfig
from ...weights import BODY_KEY
from ..coco_names import COCO_NAMES
from ..published import DetectorWeights, backbone_of_state, count_layers, published_state

if TYPE_CHECKING:
    from ..building import DetectorConfig
    from .config import MultiScaleHeadConfig

SOURCE = "Deformable-DETR checkpoint"
PUBLISHED_HEADS = 8  # Deformable-DETR's attention heads: the shapes hold heads x points, not each


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
        backbone, head = config.joiner.backbone, config.head
        levels = getattr(backbone, "levels", None)
        return {
            "backbone_kind": backbone.kind,
            "backbone_name": getattr(backbone, "name", None),  # a backbone of the user's own has no name of ours
            "levels": None if levels is None else tuple(levels),
            "dilation": getattr(backbone, "dilation", False),
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
        return BackboneConfig(
            _target_=BACKBONE_TARGETS[self.backbone_kind or "torchvision"],
            name=self.backbone_name or "resnet50",
            dilation=bool(self.dilation if dilation is None else dilation),
            levels=list(self.levels or (2, 3, 4)),
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


@dataclass(frozen=True)
class DeformableArchitecture(MultiScaleArchitecture):
    """The Deformable DETR a set of weights fits, as far as its source tells; None where it does not."""

    with_box_refine: bool | None = None
    two_stage: bool | None = None

    HEAD: ClassVar[str] = "deformable_detr"
    OVERRIDES: ClassVar[Mapping[str, str]] = {
        **MultiScaleArchitecture.OVERRIDES,
        "with_box_refine": "model.with_box_refine",
        "two_stage": "model.two_stage",
    }

    def described(self) -> list[str]:
        extra = ["box refinement"] * bool(self.with_box_refine) + ["two-stage"] * bool(self.two_stage)
        return super().described() + extra

    @classmethod
    def configured_fields(cls, config: DetectorConfig) -> dict[str, Any]:
        head = config.head
        return {
            **super().configured_fields(config),
            "with_box_refine": head.with_box_refine,
            "two_stage": head.two_stage,
        }

    def detector_config(self, num_classes: int, class_names: list[str] | None, dilation: bool | None) -> DetectorConfig:
        """The Deformable DETR these weights describe, with Deformable-DETR's offset sine encoding."""
        from ..building import DetectorConfig  # the schema imports this layout, so it is imported when used
        from .config import DeformableDetrConfig

        position = PositionConfig(_target_=POSITION_TARGETS["sine"], normalize=True, offset=-0.5)
        head = DeformableDetrConfig(
            **self.head_fields(DeformableDetrConfig()),
            with_box_refine=bool(self.with_box_refine),
            two_stage=bool(self.two_stage),
        )
        joiner = JoinerConfig(self.backbone_config(dilation), position, hidden_dim=self.hidden_dim)
        return DetectorConfig(joiner, head, num_classes, class_names)


def is_deformable_state(state: Mapping[str, object]) -> bool:
    """Whether ``state`` is a whole Deformable DETR under Deformable-DETR's names."""
    heads = ("transformer.level_embed", "class_embed.0.weight", "input_proj.0.0.weight")
    # its queries are learned (query_embed) or made from proposals (pos_trans); DINO's, with the same keys, are neither
    queries = "query_embed.weight" in state or "transformer.pos_trans.weight" in state
    return all(key in state for key in heads) and queries and any(key.startswith(BODY_KEY) for key in state)


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


def architecture_of_state(state: Mapping[str, Tensor]) -> DeformableArchitecture:
    """What the keys and shapes of a Deformable DETR state dict show about the network."""
    queries = state.get("query_embed.weight")
    return DeformableArchitecture(
        **multi_scale_fields(state),
        with_box_refine=any(key.startswith("transformer.decoder.bbox_embed.") for key in state),
        two_stage="transformer.enc_output.weight" in state,
        num_queries=None if queries is None else queries.shape[0],
    )


def with_shared_heads(state: dict[str, Tensor], architecture: DeformableArchitecture) -> dict[str, Tensor]:
    """Every copy of the class and box heads under every name the detector gives it.

    Files that store tied tensors once (transformers' safetensors) name one copy: the decoder's
    ``transformer.decoder.bbox_embed.N`` for the top-level ``bbox_embed.N`` it shares, and the first
    class head for the others (transformers ties them on load, so their values are the first's);
    without box refinement all box heads are the first too.
    """
    layers = (architecture.dec_layers or 0) + bool(architecture.two_stage)
    for head in ("class_embed", "bbox_embed"):
        for key in [key for key in state if key.startswith(f"transformer.decoder.{head}.")]:
            state.setdefault(key.removeprefix("transformer.decoder."), state[key])
        first = {key: value for key, value in state.items() if key.startswith(f"{head}.0.")}
        shared = head == "class_embed" or not architecture.with_box_refine
        for layer in range(1, layers if shared else 0):
            for key, value in first.items():
                state.setdefault(key.replace(".0.", f".{layer}.", 1), value)
    return state


def official_deformable_weights(content: Any, path: str | os.PathLike) -> DetectorWeights | None:
    """The weights of a Deformable-DETR checkpoint's content (wrapped in ``"model"`` or bare), None if it is none."""
    found = published_state(content)
    if found is None or not is_deformable_state(found[0]):
        return None
    state, skipped = found
    rows = state["class_embed.0.weight"].shape[0]
    names = list(COCO_NAMES) if rows == len(COCO_NAMES) else None  # row i is COCO id i
    return DetectorWeights(SOURCE, os.fspath(path), state, names, architecture_of_state(state), skipped=skipped)
