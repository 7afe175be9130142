"""Detection data in DETR's format: datasets, augmentation, batching and the Lightning DataModule.

The DataModule's names are imported when first used, so that code reading data for inference
(datasets, transforms) does not load Lightning; the shapes' too, so that ``python -m
detr_backbone.data.shapes`` runs the module once.
"""

from typing import Any

from .coco import CocoDetection
from .collate import DetectionCollate, collate_detection
from .folder import DegenerateBoxWarning, FolderDetection
from .sampler import EpochShuffleSampler
from .transforms import (
    DETR_SCALES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomSizeCrop,
    ToDetrFormat,
    detection_target,
    detr_base_transforms,
    detr_train_transforms,
    detr_val_transforms,
)
from .voc import VocDetection
from .yolo import YoloDetection

__all__ = [
    "CLASSES",
    "DATA_KINDS",
    "DETR_SCALES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_KINDS",
    "CocoDetection",
    "DegenerateBoxWarning",
    "DetectionCollate",
    "DetectionDataModule",
    "EpochShuffleSampler",
    "FolderDetection",
    "RandomSizeCrop",
    "ShapesDataset",
    "ToDetrFormat",
    "VocDetection",
    "YoloDetection",
    "build_datamodule",
    "collate_detection",
    "detection_target",
    "detr_base_transforms",
    "detr_train_transforms",
    "detr_val_transforms",
]

LIGHTNING_NAMES = ("DATA_KINDS", "DetectionDataModule", "build_datamodule")
SHAPES_NAMES = ("CLASSES", "SHAPE_KINDS", "ShapesDataset")


def __getattr__(name: str) -> Any:
    if name in LIGHTNING_NAMES:
        from . import datamodule

        return getattr(datamodule, name)
    if name in SHAPES_NAMES:
        from . import shapes

        return getattr(shapes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
