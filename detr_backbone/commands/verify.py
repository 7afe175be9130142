"""Check a COCO-format folder before training on it: every problem at once, one per line.

    python -m detr_backbone verify data/coco/train2017 data/coco/annotations/instances_train2017.json

Exits with status 1 when there are problems, 0 when there are none.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..data.coco_check import check_coco_folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m detr_backbone verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", help="the folder of the images")
    parser.add_argument("annotations", help="the COCO instances JSON file")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="threads decoding images (default: one per core)"
    )
    args = parser.parse_args(argv)
    report = check_coco_folder(args.images, args.annotations, args.workers)
    for problem in report.problems:
        print(problem)
    counts = f"{report.images} images, {report.annotations} annotations, {report.categories} categories"
    if report.problems:
        raise SystemExit(f"{len(report.problems)} problems in {counts}")
    print(f"no problems: {counts}", file=sys.stderr)
