"""The package's Hydra configs (``detr_backbone.conf`` once installed): found as ``pkg://detr_backbone.conf``."""
