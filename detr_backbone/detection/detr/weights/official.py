"""DETR's own checkpoints (facebookresearch/detr): ``{"model": state_dict}`` under the names our DETR keeps.

The published R50 / R101 files, with or without DC5, share one layout; only ``dilation`` differs
and the file does not record it. A class head of 92 rows is COCO's (``coco_names``), and the
other counts of COCO and Objects365 are read as theirs (``published.published_class_names``); other row
counts come from DETR trained elsewhere, whose class names the file does not hold.
"""

from __future__ import annotations

from ...published import CheckpointLayout
from .source import architecture_of_state, is_detr_state

DETR_CHECKPOINT = CheckpointLayout(
    source="DETR checkpoint",
    recognised=is_detr_state,
    architecture=architecture_of_state,
    class_weight="class_embed.weight",
)
