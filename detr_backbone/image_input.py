"""How a detector takes its images (a field of every head's schema, saved with it in checkpoints).

DETR and its descendants take ImageNet-normalised RGB and are evaluated with the shorter side resized
(the longer one capped); RT-DETR takes pixels / 255 as they are and is evaluated on a square, the aspect
ratio not kept. The data pipeline, the Predictor, evaluate, export and render read the record of the
detector they prepare images for, so a loaded detector gets its own preparation without being told.
"""

from __future__ import annotations

from dataclasses import dataclass

from .validation import require

RESIZE_KINDS = ("shorter_side", "square")


@dataclass
class InputConfig:
    """``normalize``: ImageNet mean / std after pixels / 255 (False: pixels / 255 only). ``resize`` at evaluation:
    ``shorter_side`` (to the evaluation size, the longer side at most the max size: DETR's) or ``square`` (both
    sides to the evaluation size: RT-DETR's)."""

    normalize: bool = True
    resize: str = "shorter_side"

    def __post_init__(self) -> None:
        require(
            self.resize in RESIZE_KINDS,
            f"model.input.resize={self.resize!r} is not one of {', '.join(RESIZE_KINDS)}",
        )
