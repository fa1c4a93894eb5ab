"""`Evaluator`, the Trainer's collaborator for evaluate / predict / prediction_step and for what
training does with an evaluation's metrics (ReduceLROnPlateau's step, the best metric so far).

The Trainer keeps transformers' methods (`evaluate`, `predict`, `prediction_step`, `evaluation_loop`)
as thin calls into this object, and this object calls back the members a subclass may override
(`get_eval_dataloader`, `compute_loss`, `log`, `prediction_step`) through the host, typed below. The
batch loop itself (gathering, streaming metrics) is `engine/evaluation_loop.py`'s.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..engine import checks
from ..engine.evaluation_loop import (
    EvalHost,
    ignore_keys_at_inference,
    labels_of,
    logits_without,
    speed_metrics,
)
from ..engine.evaluation_loop import evaluation_loop as run_evaluation_loop
from ..engine.optimizers import optimizer_eval_mode
from ..outputs import EvalLoopOutput, PredictionOutput
from ..telemetry.memory import MemoryTracker

if TYPE_CHECKING:
    from ..strategy.precision import Precision


class EvaluationHost(EvalHost, Protocol):
    """What evaluation needs from the Trainer beyond the loop's own needs."""

    eval_dataset: Any
    label_names: list[str]
    lr_scheduler: Any
    model_wrapped: nn.Module
    optimizer: torch.optim.Optimizer | None

    @property
    def precision(self) -> Precision: ...

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any: ...
    def get_test_dataloader(self, test_dataset: Any) -> Any: ...
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]: ...
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None: ...
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any: ...
    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]: ...


class Evaluator:
    """Runs evaluation and prediction passes for one Trainer (its `host`)."""

    def __init__(self, host: EvaluationHost) -> None:
        self.host = host

    def evaluate(self, dataset: Any, ignore_keys: list[str] | None, prefix: str) -> dict[str, float]:
        host = self.host
        if isinstance(dataset, dict):
            metrics: dict[str, float] = {}
            for name, part in dataset.items():
                metrics.update(host.evaluate(part, ignore_keys, f"{prefix}_{name}"))
            return metrics
        start = time.perf_counter()
        memory = MemoryTracker(not host.args.skip_memory_metrics).start(prefix)
        loader = host.get_eval_dataloader(dataset)
        with torch.no_grad(), optimizer_eval_mode(host.optimizer):
            # As transformers: without compute_metrics there is nothing to keep logits for.
            loss_only = True if host.compute_metrics is None else None
            output = run_evaluation_loop(host, loader, "Evaluation", loss_only, ignore_keys, prefix)
        metrics = output.metrics or {}
        metrics.update(speed_metrics(prefix, start, output.num_samples, _num_batches(loader)))
        metrics.update(memory.stop(prefix))
        host.log(metrics)
        host._fire("on_evaluate", metrics=metrics)
        host.model_wrapped.train()
        return metrics

    def predict(self, dataset: Any, ignore_keys: list[str] | None, prefix: str) -> PredictionOutput:
        host = self.host
        start = time.perf_counter()
        memory = MemoryTracker(not host.args.skip_memory_metrics).start(prefix)
        loader = host.get_test_dataloader(dataset)
        with torch.no_grad(), optimizer_eval_mode(host.optimizer):
            output: EvalLoopOutput = run_evaluation_loop(
                host, loader, "Prediction", None, ignore_keys, prefix
            )
        metrics = output.metrics or {}
        metrics.update(speed_metrics(prefix, start, output.num_samples, _num_batches(loader)))
        metrics.update(memory.stop(prefix))
        host._fire("on_predict", metrics=metrics)
        return PredictionOutput(output.predictions, output.label_ids, metrics)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """(loss, logits, labels) of one batch, without gradients."""
        host = self.host
        names = host.label_names
        has_labels = bool(names) and all(inputs.get(k) is not None for k in names)
        inputs = host._prepare_inputs(inputs)
        labels = labels_of(inputs, names) if has_labels else None
        ignore = ignore_keys if ignore_keys is not None else ignore_keys_at_inference(model)
        with torch.no_grad(), host.precision.autocast():
            if has_labels:
                loss, outputs = host.compute_loss(model, dict(inputs), return_outputs=True)
                loss = loss.mean().detach()
            else:
                loss, outputs = None, model(**inputs)
        if prediction_loss_only:
            return loss, None, None
        return loss, logits_without(outputs, ignore), labels

    def loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None,
        ignore_keys: list[str] | None,
        prefix: str,
    ) -> EvalLoopOutput:
        with torch.no_grad(), optimizer_eval_mode(self.host.optimizer):
            return run_evaluation_loop(
                self.host, dataloader, description, prediction_loss_only, ignore_keys, prefix
            )

    # -- evaluation during training ------------------------------------------------------------------
    def during_training(
        self, ignore_keys: list[str] | None, scheduler_waits_for_metrics: bool
    ) -> dict[str, float]:
        """evaluate(), then step a ReduceLROnPlateau scheduler on the metric it watches."""
        host = self.host
        metrics = host.evaluate(ignore_keys=ignore_keys)
        if scheduler_waits_for_metrics:
            key = eval_key(host.args.metric_for_best_model or "loss")
            if key not in metrics:
                raise KeyError(
                    f"ReduceLROnPlateau steps on `{key}`, which evaluate() did not return; "
                    f"set metric_for_best_model to one of {sorted(metrics)}."
                )
            host.lr_scheduler.step(metrics[key])
        return metrics

    def is_new_best(self, metrics: dict[str, float] | None) -> bool:
        """True (and the state's best metric and step updated) when `metrics` beat the best so far."""
        args, state = self.host.args, self.host.state
        if not metrics or args.metric_for_best_model is None:
            return False
        value = checks.best_metric_value(metrics, eval_key(args.metric_for_best_model))
        if value is None:  # NaN: never the best
            return False
        best = state.best_metric
        if best is None or (value > best if args.greater_is_better else value < best):
            state.best_metric = value
            state.best_global_step = state.global_step
            return True
        return False


def eval_key(metric: str) -> str:
    """The key evaluate() reports `metric` under (`eval_` prefixed, as transformers names it)."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _num_batches(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
