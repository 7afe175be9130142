"""Detectors built on the Joiner (DETR's ``models/``): one folder a head, behind one interface.

``detr/`` and ``deformable/`` each own their detector, schema, criterion, post-processing and the
published layouts they read; what they share sits beside them (``mlp``, ``layers``, ``boxes``, the
matcher's and the criterion's common part). ``registry.HEADS`` lists the heads; ``DetectorConfig``
builds any of them. DETR's names are also importable from here, as from DETR's ``models``.
"""

from .building import DetectorConfig, build_detector
from .detr import (
    DETR,
    DetrConfig,
    HungarianMatcher,
    PostProcess,
    SetCriterion,
    Transformer,
    build_detr,
    build_transformer,
)
from .head import Detector, HeadConfig
from .mlp import MLP
from .published import DetectorWeights
from .registry import HEADS, head_config, published_folder, published_weights

__all__ = [
    "DETR",
    "HEADS",
    "MLP",
    "Detector",
    "DetectorConfig",
    "DetectorWeights",
    "DetrConfig",
    "HeadConfig",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "Transformer",
    "build_detector",
    "build_detr",
    "build_transformer",
    "head_config",
    "published_folder",
    "published_weights",
]
