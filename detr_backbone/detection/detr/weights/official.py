"""DETR's own checkpoints (facebookresearch/detr): ``{"model": state_dict}`` under the names our DETR keeps.

The published R50 / R101 files, with or without DC5, share one layout; only ``dilation`` differs
and the file does not record it. A class head of 92 rows is COCO's (``coco_names``); other row
counts come from DETR trained elsewhere, whose class names the file does not hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ....weights import DDP_PREFIX
from ...coco_names import COCO_NAMES
from ...published import DetectorWeights
from .source import architecture_of_state, is_detr_state

SOURCE = "DETR checkpoint"


def official_detr_weights(content: Any, path: str | os.PathLike) -> DetectorWeights | None:
    """The weights of a DETR checkpoint's content (wrapped in ``"model"`` or bare), None if it is none."""
    state = content.get("model", content) if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        return None
    state = {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}
    if not is_detr_state(state):
        return None
    rows = state["class_embed.weight"].shape[0] - 1
    names = list(COCO_NAMES) if rows == len(COCO_NAMES) else None
    return DetectorWeights(SOURCE, os.fspath(path), state, names, architecture_of_state(state))
