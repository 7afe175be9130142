"""Lightning callbacks of the training job: the augmentation phase, checkpoints, the weights' average, the loss guard, the parameter
summary, prediction grids."""

from .augment_phase import AugmentPhase
from .ema import TRAINING_WEIGHTS_KEY, EmaWeights, WarmedUpEma
from .last_checkpoint import LastCheckpoint
from .loss_guard import NON_FINITE_ACTIONS, NonFiniteLossError, NonFiniteLossGuard
from .model_summary import ParameterSummary
from .prediction_grid import PredictionGrid

__all__ = [
    "NON_FINITE_ACTIONS",
    "TRAINING_WEIGHTS_KEY",
    "AugmentPhase",
    "EmaWeights",
    "LastCheckpoint",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ParameterSummary",
    "PredictionGrid",
    "WarmedUpEma",
]
