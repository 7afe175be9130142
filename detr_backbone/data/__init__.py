"""Detection data in DETR's format: datasets, augmentation, batching and the Lightning DataModule."""

from .coco import CocoDetection
from .collate import DetectionCollate, collate_detection
from .datamodule import DATA_KINDS, DetectionDataModule, build_datamodule
from .sampler import EpochShuffleSampler
from .shapes import CLASSES, SHAPE_KINDS, ShapesDataset
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

__all__ = [
    "CLASSES",
    "DATA_KINDS",
    "DETR_SCALES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_KINDS",
    "CocoDetection",
    "DetectionCollate",
    "DetectionDataModule",
    "EpochShuffleSampler",
    "RandomSizeCrop",
    "ShapesDataset",
    "ToDetrFormat",
    "build_datamodule",
    "collate_detection",
    "detection_target",
    "detr_base_transforms",
    "detr_train_transforms",
    "detr_val_transforms",
]
