"""Check a COCO-format folder before training on it: every problem at once, one per line.

    detr-backbone verify images=data/coco/train2017 annotations=data/coco/annotations/instances_train2017.json

Exits with status 1 when there are problems, 0 when there are none. Keys: verify.yaml.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from ..data.coco_check import check_coco_folder
from ..validation import require
from .cli import compose_command, reported


@dataclass
class VerifyConfig:
    images: Optional[str] = None  # the folder of the images
    annotations: Optional[str] = None  # the COCO instances JSON file
    workers: Optional[int] = None  # threads decoding images; null: one per core

    def __post_init__(self) -> None:
        usage = "detr-backbone verify images=<folder> annotations=<instances.json>"
        require(
            self.images is not None and self.annotations is not None, f"images and annotations are required: {usage}"
        )
        require(
            self.workers is None or self.workers >= 1, f"workers={self.workers} must be >= 1 (or null: one per core)"
        )


def main(argv: Sequence[str] | None = None) -> None:
    with reported():
        cfg = compose_command("verify", VerifyConfig, argv or [], __doc__)
        report = check_coco_folder(cfg.images, cfg.annotations, cfg.workers or os.cpu_count() or 1)
    for problem in report.problems:
        print(problem)
    counts = f"{report.images} images, {report.annotations} annotations, {report.categories} categories"
    if report.problems:
        raise SystemExit(f"{len(report.problems)} problems in {counts}")
    print(f"no problems: {counts}", file=sys.stderr)
