"""`JsonlLoggerCallback`: every log entry as one JSON line in ``output_dir/logs.jsonl``.

This is ember's built-in tracker (``report_to="jsonl"``, included in ``"all"``): no dependency,
and readable by ``ember report``, pandas (``pd.read_json(path, lines=True)``) or ``jq``.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from ember.callbacks.events import TrainerCallback

__all__ = ["LOGS_FILENAME", "JsonlLoggerCallback", "to_json_safe"]

LOGS_FILENAME = "logs.jsonl"


def to_json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None and numpy/torch scalars as Python numbers,
    so each line is strict JSON (``NaN`` is not)."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return to_json_safe(item())
    return str(value)


class JsonlLoggerCallback(TrainerCallback):
    """Appends ``{"step", "epoch", "time", **logs}`` for each ``on_log`` to ``args.output_dir/logs.jsonl``.

    ``time`` is Unix time in seconds. Only the world process zero writes. The file is opened in
    append mode for each line and closed right after, so every line is on disk once `on_log`
    returns, a crash loses nothing already logged, and a resumed run continues the same file.
    """

    def __init__(self, filename: str = LOGS_FILENAME) -> None:
        self.filename = filename

    def path(self, args: Any) -> str:
        return os.path.join(args.output_dir, self.filename)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or logs is None:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        line = json.dumps(to_json_safe(record), allow_nan=False) + "\n"
        os.makedirs(args.output_dir, exist_ok=True)
        with open(self.path(args), "a", encoding="utf-8") as f:
            f.write(line)
