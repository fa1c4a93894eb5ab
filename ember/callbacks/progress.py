"""Console output: a tqdm progress bar (`ProgressCallback`) or plain printed logs (`PrinterCallback`).

Both write on the world process zero only, so a multi-process run prints each line once.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ember.callbacks.events import TrainerCallback

__all__ = ["PrinterCallback", "ProgressCallback", "format_logs"]

# Keys shown in the bar's postfix, in this order, under these short names.
_POSTFIX_KEYS = (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "gnorm"))


def _short(value: Any, max_str_len: int) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and len(value) > max_str_len:
        return f"[string of length {len(value)} > max_str_len={max_str_len}]"
    return value


def format_logs(logs: dict[str, Any], max_str_len: int = 100) -> dict[str, Any]:
    """A copy of `logs` for display: floats to 4 significant digits, long strings elided,
    ``total_flos`` dropped (a huge number nobody reads in a console)."""
    return {k: _short(v, max_str_len) for k, v in logs.items() if k != "total_flos"}


def _tokens_per_second(logs: dict[str, Any]) -> float | None:
    for key, value in logs.items():
        if key.endswith("tokens_per_second") and isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


class ProgressCallback(TrainerCallback):
    """A tqdm bar over ``state.max_steps`` (steps, rate, ETA), its postfix showing the latest loss,
    learning rate, grad norm and tokens/s (when the logs carry a ``*tokens_per_second`` value).
    Each log dict is also written above the bar. Long strings in logs are cut to `max_str_len`
    characters.

    Evaluation during training shows its progress as the training bar's description
    (``eval 3/10``) instead of a second bar: a second bar moves the cursor up and down with escape
    sequences, which litter a piped or redirected log with ``[A`` and tear the training line in
    some terminals. `evaluate()` or `predict()` outside training get a bar of their own.
    """

    def __init__(self, max_str_len: int = 100) -> None:
        self.max_str_len = max_str_len
        self.training_bar: Any = None
        self.prediction_bar: Any = None
        self.current_step = 0
        self._eval_done = 0
        self._eval_refreshed_at = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            # A resumed run starts the bar where the checkpoint left off, so the ETA stays honest.
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)
        self.current_step = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
        self.current_step = state.global_step

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not _has_length(eval_dataloader):
            return
        if self.training_bar is not None:
            self._show_eval_on_training_bar(len(eval_dataloader))
            return
        if self.prediction_bar is None:
            from tqdm.auto import tqdm

            self.prediction_bar = tqdm(total=len(eval_dataloader), dynamic_ncols=True)
        self.prediction_bar.update(1)

    def _show_eval_on_training_bar(self, total: int) -> None:
        self._eval_done += 1
        bar = self.training_bar
        bar.set_description_str(f"eval {self._eval_done}/{total}", refresh=False)
        # Redrawn at tqdm's own pace (mininterval), like update() would, plus the first and last batch.
        now = time.monotonic()
        if self._eval_done in (1, total) or now - self._eval_refreshed_at >= bar.mininterval:
            bar.refresh()
            self._eval_refreshed_at = now

    def _end_eval(self) -> None:
        if self.prediction_bar is not None:
            self.prediction_bar.close()
            self.prediction_bar = None
        if self._eval_done and self.training_bar is not None:
            self.training_bar.set_description_str("", refresh=False)  # the next write/update redraws
        self._eval_done = 0

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_eval()

    def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end_eval()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self.training_bar is None or not logs:
            return
        self._end_eval()  # evaluate() logs its metrics before on_evaluate fires
        postfix = {short: _short(logs[key], self.max_str_len) for key, short in _POSTFIX_KEYS if key in logs}
        tokens_per_second = _tokens_per_second(logs)
        if tokens_per_second is not None:
            postfix["tok/s"] = f"{tokens_per_second:.4g}"
        if postfix:
            self.training_bar.set_postfix(postfix, refresh=False)
        self.training_bar.write(str(format_logs(logs, self.max_str_len)))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class PrinterCallback(TrainerCallback):
    """Prints each log dict (floats to 4 significant digits), for runs with ``disable_tqdm``."""

    def __init__(self, max_str_len: int = 100) -> None:
        self.max_str_len = max_str_len

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and logs is not None:
            print(format_logs(logs, self.max_str_len), flush=True)


def _has_length(obj: Any) -> bool:
    try:
        return obj is not None and len(obj) >= 0
    except (TypeError, NotImplementedError):
        return False
