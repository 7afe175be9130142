"""Detections as COCO JSON results (a list of rows), and files written of them.

Results rows hold ``image_id`` (None where the image has none), ``file_name``, ``category_id`` (the
dataset's own id), ``label`` (the class name), ``bbox`` as [x, y, width, height] in pixels of the
original image and ``score``: what pycocotools' ``COCO.loadRes`` reads, plus the two names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchvision.ops import box_convert

from ..file_writes import atomic_write
from .predictor import Detections

BOX_DECIMALS, SCORE_DECIMALS = 2, 5  # a hundredth of a pixel; scores keep their ranking to 1e-5


def detection_rows(
    detections: Detections, category_ids: Sequence[int], image_id: int | None = None, file_name: str | None = None
) -> list[dict[str, Any]]:
    """COCO results rows of one image's detections; ``category_ids[label]`` is each class's dataset id."""
    boxes = box_convert(detections.boxes.float(), "xyxy", "xywh").tolist()
    return [
        {
            "image_id": image_id,
            "file_name": file_name,
            "category_id": int(category_ids[label]),
            "label": name,
            "bbox": [round(value, BOX_DECIMALS) for value in box],
            "score": round(score, SCORE_DECIMALS),
        }
        for box, score, label, name in zip(
            boxes, detections.scores.tolist(), detections.labels.tolist(), detections.names
        )
    ]


def category_ids_by_name(
    model_names: Sequence[str], dataset_names: Sequence[str], dataset_ids: Sequence[int], where: str
) -> list[int]:
    """The dataset id of each of the model's classes, matched by name; every dataset class must be among them."""
    ids = dict(zip(dataset_names, dataset_ids))
    missing = [name for name in dataset_names if name not in model_names]
    if missing:
        raise ValueError(
            f"{where} has classes the checkpoint does not detect: {', '.join(missing)} "
            f"(the checkpoint's classes: {', '.join(model_names)})"
        )
    # a class the dataset lacks keeps a fresh id, above the dataset's, so its detections count against nothing
    spare = iter(range(max(dataset_ids, default=0) + 1, 1 << 31))
    return [ids[name] if name in ids else next(spare) for name in model_names]


def write_json(path: str | os.PathLike, content: Any, indent: int | None = None) -> Path:
    """``content`` as JSON at ``path``, written whole or not at all."""
    data = json.dumps(content, indent=indent).encode()
    return atomic_write(path, lambda stream: stream.write(data))
