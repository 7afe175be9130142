"""DINO (Zhang et al., 2023) on the Joiner, with IDEA-Research/DINO's module names so its checkpoints load strictly.

Mixed query selection, an anchor-box decoder with look-forward-twice refinement, contrastive denoising
training, its criterion, schema and published layout, on the encoder and attention of ``detection.multiscale``.
"""

from ..multiscale.denoising import DenoisingQueries, contrastive_denoising
from .config import DinoConfig
from .criterion import DinoCriterion, dino_criterion
from .dino import DINO, build_dino
from .transformer import DinoTransformer

__all__ = [
    "DINO",
    "DenoisingQueries",
    "DinoConfig",
    "DinoCriterion",
    "DinoTransformer",
    "build_dino",
    "contrastive_denoising",
    "dino_criterion",
]
