"""Interleaved timing: every variant runs once per round, so drift in machine load hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

from .machine import synchronize


def interleaved_medians(
    calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Median and spread of each call's wall time over ``repeats`` rounds, after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "repeats": len(values),
        }
        for name, values in times.items()
    }
