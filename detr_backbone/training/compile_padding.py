"""A compiled model compiles once per batch shape: when compiling, batches are padded to few shapes; a head that
compiles anew at nearly every step says so before compiling."""

from __future__ import annotations

import dataclasses

from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ..compilation import COMPILE_SIZE_DIVISIBILITY
from ..detection import record_of
from .config import Config


def padded_for_compile(config: Config) -> Config:
    """``config`` with ``data.size_divisibility`` set to 32 where model.compile or backbone.compile is on and
    it is 0: unpadded, every new batch size would compile a graph (a minute or more on a CPU)."""
    if not (config.model.compile or config.backbone.compile) or config.data.size_divisibility > 0:
        return config
    rank_zero_info(
        f"data.size_divisibility=0 with torch.compile on: batches are padded to multiples of {COMPILE_SIZE_DIVISIBILITY} "
        "so that few shapes compile (set data.size_divisibility to choose another multiple)"
    )
    data = dataclasses.replace(config.data, size_divisibility=COMPILE_SIZE_DIVISIBILITY)
    return dataclasses.replace(config, data=data)


class CompileCostWarning(UserWarning):
    """model.compile=true on a head whose training step compiles new graphs at nearly every step."""


def warn_of_compile_cost(config: Config) -> None:
    note = record_of(config.model).compile_note
    if config.model.compile and note is not None:
        rank_zero_warn(f"model.compile=true: {note}", category=CompileCostWarning)
