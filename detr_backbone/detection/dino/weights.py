"""DINO's published layout: IDEA-Research/DINO's checkpoints (``checkpoint0011_4scale.pth``), whose module names
are ours.

``{"model": state, ...}`` (``module.`` prefixes from DistributedDataParallel dropped) with
``backbone.0.body.*``, ``input_proj.N``, ``transformer.level_embed``, ``transformer.tgt_embed``,
``transformer.enc_output``, ``transformer.enc_out_{class,bbox}_embed``, ``transformer.decoder.norm``,
``transformer.decoder.ref_point_head``, ``label_enc`` and ``class_embed.N`` / ``bbox_embed.N`` (one per
decoder layer, also under ``transformer.decoder.``). Its class head has one row per COCO id (91).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ...config import POSITION_TARGETS, JoinerConfig, PositionConfig
from ...weights import BODY_KEY
from ..building import DetectorConfig
from ..multiscale.published import MultiScaleArchitecture, multi_scale_fields
from ..published import CheckpointLayout
from .config import DinoConfig

SINE_TEMPERATURE = 20  # DINO's pe_temperatureH and pe_temperatureW (DETR's is 10000)
QUERIES = "transformer.tgt_embed.weight"


@dataclass(frozen=True)
class DinoArchitecture(MultiScaleArchitecture):
    """The DINO a set of weights fits, as far as its source tells; None where it does not."""

    HEAD: ClassVar[str] = "dino"
    QUERIES: ClassVar[str] = QUERIES
    # label_enc: one row per class and one more
    CLASS_TABLES: ClassVar[Mapping[str, int]] = {"label_enc.weight": 1}

    def detector_config(self, num_classes: int, class_names: list[str] | None, dilation: bool | None) -> DetectorConfig:
        """The DINO these weights describe, with DINO's sine encoding (temperature 20, no offset)."""
        position = PositionConfig(_target_=POSITION_TARGETS["sine"], normalize=True, temperature=SINE_TEMPERATURE)
        head = DinoConfig(**self.head_fields(DinoConfig()))
        joiner = JoinerConfig(self.backbone_config(dilation), position, hidden_dim=self.hidden_dim)
        return DetectorConfig(joiner, head, num_classes, class_names)


def is_dino_state(state: Mapping[str, object]) -> bool:
    """Whether ``state`` is a whole DINO under DINO's names."""
    heads = ("transformer.level_embed", QUERIES, "label_enc.weight", "class_embed.0.weight", "input_proj.0.0.weight")
    return all(key in state for key in heads) and any(key.startswith(BODY_KEY) for key in state)


def architecture_of_state(state: Mapping[str, Tensor]) -> DinoArchitecture:
    """What the keys and shapes of a DINO state dict show about the network."""
    return DinoArchitecture(**multi_scale_fields(state), num_queries=state[QUERIES].shape[0])


DINO_CHECKPOINT = CheckpointLayout(
    source="DINO checkpoint",
    recognised=is_dino_state,
    architecture=architecture_of_state,
    class_weight="class_embed.0.weight",
)
