"""COCO box metrics, computed by pycocotools' COCOeval (or faster-coco-eval's) from the files themselves.

The numbers are those of ``COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")``
after ``evaluate()``, ``accumulate()`` and ``summarize()``; per-class AP is the mean of its
precision array over IoU thresholds and recall points (area all, 100 detections), the way
Detectron2 and MMDetection report it. faster-coco-eval reimplements COCOeval in C++ with the same
API and arrays; it gives the same numbers several times faster.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data.coco import load_coco

# the names torchmetrics' MeanAveragePrecision(backend=...) takes; each module's (COCO, COCOeval) classes
COCO_BACKENDS = {
    "pycocotools": ("pycocotools", "pycocotools.coco.COCO", "pycocotools.cocoeval.COCOeval"),
    "faster_coco_eval": ("faster-coco-eval", "faster_coco_eval.COCO", "faster_coco_eval.COCOeval_faster"),
}

# COCOeval.stats, in its order
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


@dataclass
class CocoMetrics:
    summary: dict[str, float]  # STAT_NAMES -> value (-1: no ground truth of that kind, as COCOeval says)
    per_class: dict[str, dict[str, float | None]]  # class name -> {"AP", "AP50"}; None without ground truth
    summary_text: str  # COCOeval.summarize()'s twelve lines
    images: int
    detections: int = 0
    files: dict[str, str] = field(default_factory=dict)
    source: dict | None = None  # an exported file's: its checkpoint's summary and the differences to it
    data: str = ""  # which validation set, in words

    def as_json(self) -> dict:
        return {
            "summary": self.summary,
            "per_class": self.per_class,
            "images": self.images,
            "detections": self.detections,
            "files": self.files,
        }


def check_coco_backend(backend: str, key: str = "backend") -> None:
    """A clear error for a backend that is not one, or whose package is not installed."""
    if backend not in COCO_BACKENDS:
        raise ValueError(f"{key}={backend!r} is not one of {', '.join(COCO_BACKENDS)}")
    package, coco, _ = COCO_BACKENDS[backend]
    if importlib.util.find_spec(coco.partition(".")[0]) is None:
        raise ValueError(f"{key}={backend!r} needs the {package} package: pip install {package}")


def backend_classes(backend: str) -> tuple[type[COCO], type[COCOeval]]:
    """The COCO index and COCOeval classes of ``backend``."""
    check_coco_backend(backend)
    classes = []
    for path in COCO_BACKENDS[backend][1:]:
        module, _, name = path.rpartition(".")
        classes.append(getattr(importlib.import_module(module), name))
    return classes[0], classes[1]


def class_precision(evaluation: COCOeval, index: int, iou: float | None = None) -> float | None:
    """Mean precision of category ``index`` over recall (and IoU thresholds, unless ``iou`` picks one)."""
    precision = evaluation.eval["precision"][:, :, index, 0, -1]  # [IoU, recall], area all, maxDets 100
    if iou is not None:
        precision = precision[np.isclose(evaluation.params.iouThrs, iou)]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def coco_metrics(
    ground_truth: str | os.PathLike, detections: str | os.PathLike, backend: str = "pycocotools"
) -> CocoMetrics:
    """COCOeval's bbox metrics of a results file against an instances file, by ``backend``'s COCOeval."""
    index, evaluator = backend_classes(backend)
    truth = load_coco(Path(ground_truth), index)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # loadRes, evaluate and accumulate print progress lines
        found = truth.loadRes(os.fspath(detections))
        evaluation = evaluator(truth, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        evaluation.summarize()
    per_class = {
        truth.cats[cat_id]["name"]: {
            "AP": class_precision(evaluation, index),
            "AP50": class_precision(evaluation, index, 0.5),
        }
        for index, cat_id in enumerate(evaluation.params.catIds)
    }
    summary = {name: float(value) for name, value in zip(STAT_NAMES, evaluation.stats)}
    return CocoMetrics(summary, per_class, text.getvalue().rstrip("\n"), len(truth.imgs), len(found.anns))


def per_class_table(metrics: CocoMetrics) -> str:
    """The per-class AP (IoU 0.50:0.95) and AP50 as an aligned text table."""
    width = max([len("class"), *(len(name) for name in metrics.per_class)])
    lines = [f"{'class':<{width}}  {'AP':>6}  {'AP50':>6}"]
    for name, values in metrics.per_class.items():
        cells = [
            "-" if value is None or math.isnan(value) else f"{value:.3f}" for value in (values["AP"], values["AP50"])
        ]
        lines.append(f"{name:<{width}}  {cells[0]:>6}  {cells[1]:>6}")
    return "\n".join(lines)
