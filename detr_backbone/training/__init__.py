"""The training job: config schemas, the LightningModule, its callbacks and the Trainer around them."""

from .config import Config, register_configs
from .job import Job, build_module, validated
from .module import DetrModule, build_detector

__all__ = ["Config", "DetrModule", "Job", "build_detector", "build_module", "register_configs", "validated"]
