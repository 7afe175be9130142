"""DETR's own checkpoints (facebookresearch/detr): ``{"model": state_dict}`` under the names our DETR keeps.

The published R50 / R101 files, with or without DC5, share one layout; only ``dilation`` differs
and the file does not record it. A class head of 92 rows is COCO's (``coco_names``); other row
counts come from DETR trained elsewhere, whose class names the file does not hold.
"""

from __future__ import annotations

import os
from typing import Any

from ...coco_names import COCO_NAMES
from ...published import DetectorWeights, published_state
from .source import architecture_of_state, is_detr_state

SOURCE = "DETR checkpoint"


def official_detr_weights(content: Any, path: str | os.PathLike) -> DetectorWeights | None:
    """The weights of a DETR checkpoint's content (wrapped in ``"model"`` or bare), None if it is none."""
    found = published_state(content)
    if found is None or not is_detr_state(found[0]):
        return None
    state, skipped = found
    rows = state["class_embed.weight"].shape[0] - 1
    names = list(COCO_NAMES) if rows == len(COCO_NAMES) else None  # row i is COCO id i
    return DetectorWeights(SOURCE, os.fspath(path), state, names, architecture_of_state(state), skipped=skipped)
