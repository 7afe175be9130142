"""Putting a trained detector to work: the inference API, COCO files and metrics, export to ONNX / torch.export."""

from .checkpoint import LoadedDetector, UnnamedClassesWarning, load_detector
from .coco_metrics import STAT_NAMES, CocoMetrics, coco_metrics
from .export import ExportableDetector, ExportCheckError, Tolerance, export_detector
from .exported import load_exported
from .predictor import Detections, Predictor

__all__ = [
    "STAT_NAMES",
    "CocoMetrics",
    "Detections",
    "ExportCheckError",
    "ExportableDetector",
    "LoadedDetector",
    "Predictor",
    "Tolerance",
    "UnnamedClassesWarning",
    "coco_metrics",
    "export_detector",
    "load_detector",
    "load_exported",
]
