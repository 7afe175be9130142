"""Deformable DETR's published layout: Deformable-DETR's own checkpoints, whose module names are ours.

``{"model": state, "args": Namespace(...), ...}`` with ``backbone.0.body.*``, ``transformer.level_embed``,
``input_proj.N``, ``class_embed.N`` / ``bbox_embed.N`` (one per decoder layer, + one with two-stage),
``query_embed`` (not with two-stage), ``transformer.decoder.bbox_embed.N`` with box refinement and
``transformer.enc_output`` with two-stage. What the shapes show is read here; dilation and how the
sampling points split into heads and points per head are not in them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ...config import POSITION_TARGETS, JoinerConfig, PositionConfig
from ...weights import BODY_KEY
from ..building import DetectorConfig
from ..multiscale.published import MultiScaleArchitecture, multi_scale_fields
from ..published import CheckpointLayout
from .config import DeformableDetrConfig


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


DEFORMABLE_DETR_CHECKPOINT = CheckpointLayout(
    source="Deformable-DETR checkpoint",
    recognised=is_deformable_state,
    architecture=architecture_of_state,
    class_weight="class_embed.0.weight",
)
