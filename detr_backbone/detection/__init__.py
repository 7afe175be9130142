"""Detectors built on the Joiner (DETR's ``models/``): one folder a head, behind one interface.

Each head's folder owns its detector, schema, criterion and the published layouts it reads; what heads
share sits beside the folders (``multiscale/`` for the heads on deformable attention; ``mlp``, ``layers``,
``boxes``, the matcher's and the criterion's common part for all). ``registry.HEADS`` holds one record per
head, from which every list of heads is derived; ``DetectorConfig`` builds any of them. DETR's names are
also importable from here, as from DETR's ``models``.
"""

from .building import DetectorConfig
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
from .head import Detector, HeadConfig, TransformerHeadConfig
from .mlp import MLP
from .published import DetectorWeights, PublishedArchitecture
from .registry import (
    HEADS,
    HeadRecord,
    build_criterion,
    build_detector,
    detector_config,
    head_config,
    published_folder,
    published_sources,
    published_weights,
    record_of,
)

__all__ = [
    "DETR",
    "HEADS",
    "MLP",
    "Detector",
    "DetectorConfig",
    "DetectorWeights",
    "DetrConfig",
    "HeadConfig",
    "HeadRecord",
    "HungarianMatcher",
    "PostProcess",
    "PublishedArchitecture",
    "SetCriterion",
    "Transformer",
    "TransformerHeadConfig",
    "build_criterion",
    "build_detector",
    "build_detr",
    "build_transformer",
    "detector_config",
    "head_config",
    "published_folder",
    "published_sources",
    "published_weights",
    "record_of",
]
