"""Trainable and frozen parameter counts of each part of the detector, printed when a fit starts.

Lightning's own summary lists modules; what a DETR user needs to see is which parts train after the
freezing rules ran: the backbone body (stem and early stages frozen by DETR's rule), the learned
positional table (frozen when its lr is 0), the transformer and the heads. Frozen BatchNorm
statistics and affine terms are buffers, not parameters, so they are counted apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

# (row label, module path inside DetrModule); a parameter counts in the first part whose path prefixes it
DETR_PARTS: tuple[tuple[str, str], ...] = (
    ("backbone body", "detector.backbone.0"),
    ("positional table", "detector.backbone.1"),
    ("transformer", "detector.transformer"),
    ("input_proj", "detector.input_proj"),
    ("query_embed", "detector.query_embed"),
    ("class_embed", "detector.class_embed"),
    ("bbox_embed", "detector.bbox_embed"),
)
OTHER = "other"


@dataclass
class PartCount:
    part: str
    trainable: int = 0
    frozen: int = 0
    buffers: int = 0  # elements of floating-point buffers, e.g. frozen BatchNorm's weight, bias and statistics


def part_of(name: str, parts: Sequence[tuple[str, str]]) -> str:
    return next((label for label, path in parts if name.startswith(path + ".")), OTHER)


def count_parts(module: nn.Module, parts: Sequence[tuple[str, str]] = DETR_PARTS) -> list[PartCount]:
    """One row per part (in ``parts`` order, then ``other`` if anything is left), then ``total``."""
    rows = {label: PartCount(label) for label, _ in parts}
    rows[OTHER] = PartCount(OTHER)
    for name, parameter in module.named_parameters():
        row = rows[part_of(name, parts)]
        if parameter.requires_grad:
            row.trainable += parameter.numel()
        else:
            row.frozen += parameter.numel()
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point():
            rows[part_of(name, parts)].buffers += buffer.numel()
    if not (rows[OTHER].trainable or rows[OTHER].frozen or rows[OTHER].buffers):
        del rows[OTHER]
    counts = list(rows.values())
    total = PartCount(
        "total", *(sum(getattr(row, key) for row in counts) for key in ("trainable", "frozen", "buffers"))
    )
    return [*counts, total]


def format_counts(counts: Sequence[PartCount]) -> str:
    """A plain-text table, thousands separated, the total under a rule."""
    header = f"{'part':<18}{'trainable':>14}{'frozen':>14}{'buffers':>14}"
    lines = [f"{row.part:<18}{row.trainable:>14,}{row.frozen:>14,}{row.buffers:>14,}" for row in counts]
    return "\n".join([header, *lines[:-1], "-" * len(header), lines[-1]])


class ParameterSummary(Callback):
    """Prints the per-part table of :func:`count_parts` once, at the start of every fit (global zero only)."""

    def __init__(self, parts: Sequence[tuple[str, str]] = DETR_PARTS):
        self.parts = tuple(parts)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info("Parameters by part:\n" + format_counts(count_parts(pl_module, self.parts)))
