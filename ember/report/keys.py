"""What a log key or value is, written once for every reader of logs: the text summary of
`ember report`, its plots, and the model card."""

from __future__ import annotations

import math
from typing import Any

#: Timing figures every evaluation reports beside its metrics; they say how fast, not how good.
_TIMING_SUFFIXES = ("_runtime", "_per_second", "_jit_compilation_time", "_model_preparation_time")


def is_eval_metric(key: str) -> bool:
    """An evaluation result (`eval_loss`, `eval_accuracy`, `eval_<name>_f1`, ...): evaluate()'s keys
    without its timings and memory deltas (`eval_runtime`, `eval_samples_per_second`, `eval_mem_*`)."""
    return key.startswith("eval_") and not key.endswith(_TIMING_SUFFIXES) and "_mem_" not in key


def is_number(value: Any) -> bool:
    """A finite real log value (bools are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def format_value(value: Any, decimals: int | None = None) -> str:
    """A log value for a table: floats to `decimals` places, or to 4 significant digits (large ones
    whole, with thousands separators); anything else as `str()` gives it."""
    if not isinstance(value, float):
        return str(value)
    if decimals is not None:
        return f"{value:.{decimals}f}"
    return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
