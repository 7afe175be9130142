"""The number a run hands back to Hydra, and through it to a sweeper: the metric ``optimized_metric`` names."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class MetricNotLoggedError(LookupError):
    """``optimized_metric`` names a metric the run never logged."""


def optimized_value(name: str, logged: Mapping[str, Any], monitor: str, best_score: Any) -> float | None:
    """The best checkpoint's score when ``name`` is the checkpoint's monitored metric, else the metric's
    last logged value.

    None when there is nothing to report (no checkpoint was scored, as under fast_dev_run) or the value
    is not finite. The Optuna sweeper records a None as a failed trial and goes on, whereas a NaN ends
    the study: Optuna refuses a NaN result, then refuses the sweeper's failure report that repeats it.
    """
    if name == monitor:
        value = best_score
    elif name in logged:
        value = logged[name]
    else:
        raise MetricNotLoggedError(f"optimized_metric={name!r} was never logged; logged: {', '.join(sorted(logged))}")
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)
