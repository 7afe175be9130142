"""What the real-time heads share (RT-DETRv2, D-FINE): their schema, the hybrid encoder (AIFI and CCFF) and the
varifocal criterion."""

from .config import RealTimeHeadConfig
from .criterion import VarifocalSetCriterion, varifocal_criterion
from .hybrid_encoder import HybridEncoder, grid_sine_embedding

__all__ = ["HybridEncoder", "RealTimeHeadConfig", "VarifocalSetCriterion", "grid_sine_embedding", "varifocal_criterion"]
