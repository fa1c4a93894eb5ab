"""Result containers with the transformers names, so user code that unpacks them keeps working."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class EvalPrediction:
    """What `compute_metrics` receives: predictions, label_ids and, on request, inputs and losses.

    Unpacks as `(predictions, label_ids)` (plus inputs/losses when present) like the transformers
    class, so `preds, labels = eval_pred` works.
    """

    def __init__(
        self,
        predictions: Any,
        label_ids: Any,
        inputs: Any = None,
        losses: Any = None,
    ) -> None:
        self.predictions = predictions
        self.label_ids = label_ids
        self.inputs = inputs
        self.losses = losses
        extra = tuple(x for x in (inputs, losses) if x is not None)
        self._fields: tuple[Any, ...] = (predictions, label_ids, *extra)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._fields)

    def __getitem__(self, idx: int) -> Any:
        return self._fields[idx]

    def __len__(self) -> int:
        return len(self._fields)


class EvalLoopOutput(NamedTuple):
    predictions: np.ndarray | tuple[np.ndarray, ...] | None
    label_ids: np.ndarray | tuple[np.ndarray, ...] | None
    metrics: dict[str, float] | None
    num_samples: int | None


class PredictionOutput(NamedTuple):
    predictions: np.ndarray | tuple[np.ndarray, ...] | None
    label_ids: np.ndarray | tuple[np.ndarray, ...] | None
    metrics: dict[str, float] | None


class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict[str, float]
