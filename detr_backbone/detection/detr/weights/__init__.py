"""Published DETR weights under our DETR's names: DETR's own checkpoints and Hugging Face DETR folders."""

from __future__ import annotations

import os
from typing import Any

from ...coco_names import COCO_NAMES, UNUSED
from ...published import DetectorWeights
from .hugging_face import HUGGING_FACE_DETR, is_hugging_face_state
from .official import official_detr_weights
from .source import Architecture, architecture_of_state, is_detr_state


def read_hugging_face_folder(folder: str | os.PathLike) -> DetectorWeights | None:
    """The weights of a Hugging Face DETR folder, None if the folder holds another model."""
    return HUGGING_FACE_DETR.read_folder(folder)


def published_detector_weights(content: Any, path: str | os.PathLike) -> DetectorWeights | None:
    """The weights of a file's content if it is a DETR or Hugging Face DETR checkpoint, else None.

    A Hugging Face weights file is read with the ``config.json`` beside it.
    """
    if isinstance(content, dict) and is_hugging_face_state(content):
        return HUGGING_FACE_DETR.read_file(content, path)
    return official_detr_weights(content, path)


__all__ = [
    "COCO_NAMES",
    "UNUSED",
    "Architecture",
    "DetectorWeights",
    "architecture_of_state",
    "is_detr_state",
    "official_detr_weights",
    "published_detector_weights",
    "read_hugging_face_folder",
]
