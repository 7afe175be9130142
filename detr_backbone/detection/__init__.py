"""Detectors built on the Joiner, with their set losses and post-processing (DETR's ``models/``)."""

from .criterion import SetCriterion
from .detr import DETR, MLP, build_detr
from .matcher import HungarianMatcher
from .postprocess import PostProcess
from .transformer import Transformer, build_transformer

__all__ = [
    "DETR",
    "MLP",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "Transformer",
    "build_detr",
    "build_transformer",
]
