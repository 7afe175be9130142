"""DETR (Carion et al., 2020) on the Joiner, with DETR's module names so its checkpoints load strictly:
the transformer, the detector, its softmax matcher, criterion and post-processing, its schema and
the published layouts it reads (DETR's checkpoints, Hugging Face DETR)."""

from .config import DetrConfig
from .criterion import SetCriterion
from .detr import DETR, build_detr
from .matcher import HungarianMatcher
from .postprocess import PostProcess, softmax_detections
from .transformer import Transformer, build_transformer

__all__ = [
    "DETR",
    "DetrConfig",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "Transformer",
    "build_detr",
    "build_transformer",
    "softmax_detections",
]
