"""`EarlyStoppingCallback`: stop training when the tracked eval metric stops improving."""

from __future__ import annotations

import logging
from typing import Any

from ember.callbacks.events import TrainerCallback
from ember.callbacks.state import ExportableState

logger = logging.getLogger(__name__)

__all__ = ["EarlyStoppingCallback"]


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stops training after `early_stopping_patience` evaluations in a row without improvement.

    Improvement is judged on ``args.metric_for_best_model`` (``eval_`` prefix optional) against
    ``state.best_metric``, which the trainer updates after each evaluation: a value counts as
    better only if it beats the best in the direction of ``args.greater_is_better`` by more than
    `early_stopping_threshold`. The patience counter is saved in checkpoints, so a resumed run
    keeps counting where it stopped.
    """

    def __init__(
        self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0
    ) -> None:
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        # Evaluations in a row without improvement.
        self.early_stopping_patience_counter = 0

    def check_metric_value(self, args: Any, state: Any, control: Any, metric_value: float) -> None:
        best = state.best_metric
        threshold = self.early_stopping_threshold or 0.0
        if best is None:
            improved = True
        else:
            beats = metric_value > best if args.greater_is_better else metric_value < best
            improved = beats and abs(metric_value - best) > threshold
        if improved:
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.load_best_model_at_end:
            logger.warning(
                "EarlyStoppingCallback is used without load_best_model_at_end=True: the best model will "
                "not be loaded automatically when training ends."
            )
        if args.metric_for_best_model is None:
            raise ValueError(
                "EarlyStoppingCallback needs `metric_for_best_model`; set it to the eval metric to watch, "
                "e.g. metric_for_best_model='loss'."
            )
        if args.eval_strategy == "no":
            raise ValueError(
                "EarlyStoppingCallback needs evaluations during training; "
                "set `eval_strategy` to 'steps' or 'epoch'."
            )

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        key = args.metric_for_best_model
        if not key.startswith("eval_"):
            key = f"eval_{key}"
        value = (metrics or {}).get(key)
        if value is None:
            logger.warning(
                "Early stopping needs the metric %s (from metric_for_best_model), but the evaluation did not "
                "return it; early stopping is disabled for this evaluation.",
                key,
            )
            return
        self.check_metric_value(args, state, control, value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {"early_stopping_patience_counter": self.early_stopping_patience_counter},
        }
