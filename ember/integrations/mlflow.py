"""`MLflowCallback` (``report_to="mlflow"``): parameters and metrics in an MLflow tracking store.

Environment (the names transformers honours): ``MLFLOW_TRACKING_URI`` (unset: MLflow's own default,
``sqlite:///mlflow.db`` in the working directory for MLflow 3), ``MLFLOW_EXPERIMENT_NAME`` (created
if missing), ``MLFLOW_TAGS`` (a JSON object set as run tags), ``MLFLOW_RUN_ID`` (log into that
existing run), ``MLFLOW_NESTED_RUN=true`` (start ours inside the active run).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ember.integrations import run_config, scalar_value
from ember.integrations.tracker import RunTracker

__all__ = ["MLflowCallback", "flatten_params"]

_TRUE = ("1", "true", "yes", "on")
_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")  # what MLflow accepts in metric and param names


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested dicts as dotted keys: ``{"a": {"b": 1}}`` -> ``("a.b", 1)``."""
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten_params(value, prefix=name + ".")
        else:
            yield name, value


class MLflowCallback(RunTracker):
    """Starts a run when training begins (or at the first log), records the arguments and model
    config as params, logs each log dict's numbers as metrics at ``state.global_step``, and ends the
    run when training ends, if this callback started it (a run the user opened is left open).

    Params are flattened to dotted keys; a value longer than MLflow allows is cut to its limit
    (with a trailing ``...``) rather than dropped, and keys are sent 100 at a time as MLflow
    requires. Metric keys keep the Trainer's names (``loss``, ``eval_loss``), with characters MLflow
    rejects replaced by ``_``. Only the world process zero talks to MLflow.
    """

    def __init__(self) -> None:
        import mlflow
        from mlflow.utils import validation

        self._mlflow = mlflow
        self._max_value = int(getattr(validation, "MAX_PARAM_VAL_LENGTH", 6000))
        self._max_key = int(getattr(validation, "MAX_ENTITY_KEY_LENGTH", 250))
        self._batch = int(getattr(validation, "MAX_PARAMS_TAGS_PER_BATCH", 100))
        self.run_id: str | None = None
        self._owns_run = False

    def setup(self, args: Any, state: Any, model: Any = None) -> None:
        """Start (or adopt) the run, log params and tags; called once per training run."""
        mlflow = self._mlflow  # reads MLFLOW_TRACKING_URI itself
        existing_run = os.environ.get("MLFLOW_RUN_ID")
        nested = os.environ.get("MLFLOW_NESTED_RUN", "false").lower() in _TRUE
        if mlflow.active_run() is not None and not nested and not existing_run:
            self.run_id, self._owns_run = mlflow.active_run().info.run_id, False
        else:
            if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
                mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
            name = getattr(state, "trial_name", None) or args.run_name
            run = mlflow.start_run(run_id=existing_run, run_name=name, nested=nested)
            self.run_id, self._owns_run = run.info.run_id, True
        self._log_params(run_config(args, model))
        tags = os.environ.get("MLFLOW_TAGS")
        if tags:
            mlflow.set_tags(json.loads(tags))

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(self._key(k), self._value(v)) for k, v in flatten_params(params)]
        client, run_id = self._mlflow.MlflowClient(), str(self.run_id)
        for start in range(0, len(items), self._batch):
            client.log_batch(run_id, params=items[start : start + self._batch])

    def _key(self, key: str) -> str:
        return _BAD_KEY_CHARS.sub("_", key)[: self._max_key]

    def _value(self, value: Any) -> str:
        text = str(value)
        return text if len(text) <= self._max_value else text[: self._max_value - 3] + "..."

    def has_run(self) -> bool:
        return self.run_id is not None

    def forget_run(self) -> None:
        self.run_id = None

    def log_values(self, state: Any, logs: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = []
        for key, value in logs.items():
            number = scalar_value(value)
            if number is not None:  # NaN and inf included: MLflow stores them, and they matter
                metrics.append(Metric(self._key(key), number, now_ms, state.global_step))
        # Through the client with our run id, so an evaluate() after train() ended still lands in
        # the training run instead of starting a new one.
        if metrics:
            self._mlflow.MlflowClient().log_batch(str(self.run_id), metrics=metrics)

    def close_run(self) -> None:
        active = self._mlflow.active_run()
        if self._owns_run and active is not None and active.info.run_id == self.run_id:
            self._mlflow.end_run()
        self._owns_run = False
