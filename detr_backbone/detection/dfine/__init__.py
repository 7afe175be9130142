"""D-FINE (Peng et al., 2024) on the Joiner, with Peterande/D-FINE's module names so its checkpoints load:
boxes as distributions refined layer by layer (FDR) on the real-time heads' hybrid encoder and query selection."""

from .config import DFineConfig
from .decoder import DFineTransformer
from .dfine import DFINE, build_dfine

__all__ = ["DFINE", "DFineConfig", "DFineTransformer", "build_dfine"]
