"""The training job: config schemas, the LightningModule, its callbacks and the Trainer around them."""

from .config import Config, register_configs
from .job import Job, build_module, validated
from .module import DetrModule, load_training_module

__all__ = ["Config", "DetrModule", "Job", "build_module", "load_training_module", "register_configs", "validated"]
