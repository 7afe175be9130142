"""Check a folder before training on it: every problem at once, one per line.

    detr-backbone verify images=data/coco/train2017 annotations=data/coco/annotations/instances_train2017.json
    detr-backbone verify data=yolo data.root=data/parts          # its data.yaml's train and val splits
    detr-backbone verify data=voc data.root=data/VOC2007         # ImageSets/Main/train.txt and val.txt

Exits with status 1 when there are problems, 0 when there are none. Keys: verify.yaml.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from ..data.coco_check import FolderReport, check_coco_folder
from ..data.folder_check import check_voc_folder, check_yolo_folder
from ..training.config import DataConfig
from ..validation import require
from .cli import compose_command, reported

USAGE = "detr-backbone verify images=<folder> annotations=<instances.json>, or data=yolo|voc data.root=<folder>"
CHECKED_KINDS = ("yolo", "voc")  # the data kinds verify reads from a data config; COCO's by images= and annotations=


@dataclass
class VerifyConfig:
    images: Optional[str] = None  # the folder of the images
    annotations: Optional[str] = None  # the COCO instances JSON file
    data: Optional[DataConfig] = None  # data=yolo or data=voc with data.root: that folder's train and val splits
    workers: Optional[int] = None  # threads decoding images; null: one per core

    def __post_init__(self) -> None:
        coco = self.images is not None and self.annotations is not None
        require(coco or self.data is not None, f"images and annotations, or a data folder, are required: {USAGE}")
        require(not (coco and self.data is not None), f"give images and annotations, or data=, not both: {USAGE}")
        if self.data is not None:
            require(
                self.data.kind in CHECKED_KINDS,
                f"data={self.data.kind} is not one of {', '.join(CHECKED_KINDS)}: {USAGE}",
            )
            require(self.data.root is not None, f"data.root is required with data={self.data.kind}: {USAGE}")
        require(
            self.workers is None or self.workers >= 1, f"workers={self.workers} must be >= 1 (or null: one per core)"
        )


def check(cfg: VerifyConfig) -> FolderReport:
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.data is None:
        return check_coco_folder(cfg.images, cfg.annotations, workers)
    splits = (cfg.data.train_split, cfg.data.val_split)
    if cfg.data.kind == "yolo":
        return check_yolo_folder(cfg.data.root, splits, workers)
    return check_voc_folder(cfg.data.root, splits, cfg.data.classes, workers)


def main(argv: Sequence[str] | None = None) -> None:
    with reported():
        cfg = compose_command("verify", VerifyConfig, argv or [], __doc__)
        report = check(cfg)
    for problem in report.problems:
        print(problem)
    counts = f"{report.images} images, {report.annotations} annotations, {report.categories} categories"
    if report.problems:
        raise SystemExit(f"{len(report.problems)} problems in {counts}")
    print(f"no problems: {counts}", file=sys.stderr)
