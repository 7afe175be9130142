"""What a dataset does with a sample whose image cannot be read (``data.bad_samples``).

``error`` stops at the first one, naming the file. ``skip`` (the default) takes the next readable
sample in its place, so that one damaged file in a folder of 100,000 costs a sample, not a run at
hour twenty, and marks the stand-in's target with the file it replaces (``target["replaces"]``). The
marks travel with the batch out of the loader's worker processes to the training process, which warns
once per file, counts them in the log and stops the run when too many are bad
(``training/callbacks/bad_samples.py``). ``python -m detr_backbone verify`` finds them all beforehand.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional, TypeVar

from .images import BadImageError, UnreadableImageError

BAD_SAMPLE_ACTIONS = ("error", "skip")
REPLACES = "replaces"  # target key of a stand-in sample: the path of the image it replaces

Sample = TypeVar("Sample")


def check_bad_samples_action(action: str) -> None:
    if action not in BAD_SAMPLE_ACTIONS:
        raise ValueError(f"data.bad_samples={action!r} is not one of {', '.join(BAD_SAMPLE_ACTIONS)}")


def check_bad_samples(action: str, max_fraction: float) -> None:
    check_bad_samples_action(action)
    if not 0 <= max_fraction <= 1:
        raise ValueError(f"data.max_bad_fraction={max_fraction} must be in [0, 1]")


def load_or_replace(
    load: Callable[[int], Sample], index: int, size: int, action: str, path_of: Callable[[int], Path]
) -> tuple[Sample, Optional[Path]]:
    """``(load(index), None)``; if its image is bad and ``action`` is skip, ``(load(j), bad path)`` for the
    first readable j after ``index`` (wrapping around), so the choice is the same in every epoch and process."""
    try:
        return load(index), None
    except BadImageError:
        if action == "error":
            raise
    for offset in range(1, size):
        try:
            return load((index + offset) % size), path_of(index)
        except BadImageError:
            continue
    raise UnreadableImageError(f"no image of the dataset can be read (the first: {path_of(index)})")
