"""Lightning callbacks of the training job: checkpoints, the loss guard, the parameter summary, prediction grids."""

from .last_checkpoint import LastCheckpoint
from .loss_guard import NON_FINITE_ACTIONS, NonFiniteLossError, NonFiniteLossGuard
from .model_summary import ParameterSummary
from .prediction_grid import PredictionGrid

__all__ = [
    "NON_FINITE_ACTIONS",
    "LastCheckpoint",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ParameterSummary",
    "PredictionGrid",
]
