"""The Trainer's evaluation and prediction members: their dataloaders, `evaluate()`, `predict()`,
`prediction_step()`, and what training does with an evaluation's metrics (ReduceLROnPlateau's step,
the best metric so far); kept out of trainer/trainer.py so that file stays about training. The batch loop
they run (gathering, streaming metrics) is `engine/evaluation_loop.py`'s."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data import build_eval_dataloader
from ..engine import checks
from ..engine.evaluation_loop import (
    evaluation_loop as run_evaluation_loop,  # apart from the method of that name
)
from ..engine.evaluation_loop import ignore_keys_at_inference, labels_of, logits_without, speed_metrics
from ..engine.optimizers import optimizer_eval_mode
from ..outputs import EvalLoopOutput, PredictionOutput
from ..telemetry.memory import MemoryTracker
from .full_eval import full_eval_model

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..callbacks import CallbackHandler
    from ..callbacks.state import TrainerControl, TrainerState
    from ..strategy.base import Strategy
    from ..strategy.precision import Precision


class TrainerEvaluation:
    """Mixed into `Trainer`; relies on its parts (below) and calls the members subclasses override
    (`compute_loss`, `log`, `prediction_step`) through `self`."""

    args: TrainingArguments
    state: TrainerState
    control: TrainerControl
    strategy: Strategy
    precision: Precision
    callback_handler: CallbackHandler
    model: nn.Module
    model_wrapped: nn.Module
    eval_dataset: Any
    data_collator: Callable[[list[Any]], dict[str, Any]]
    label_names: list[str]
    compute_metrics: Callable[..., Any] | None
    preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None
    lr_scheduler: Any

    if TYPE_CHECKING:  # defined by Trainer and TrainerLogging

        def _fire(self, event: str, **kwargs: Any) -> None: ...
        def _prepare_dataset(self, dataset: Any, description: str) -> Any: ...
        def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]: ...
        def compute_loss(
            self,
            model: nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> Any: ...
        def log(self, logs: dict[str, float], start_time: float | None = None) -> None: ...
        @property
        def scheduler_waits_for_metrics(self) -> bool: ...

    # -- dataloaders ---------------------------------------------------------------------------------
    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError(
                "evaluate() needs an eval dataset: pass `eval_dataset` to Trainer(...) or evaluate()."
            )
        checks.check_eval_dataset_not_empty(dataset)
        loader = build_eval_dataloader(
            self._prepare_dataset(dataset, "evaluation"),
            self.args,
            self.data_collator,
            rank=self.strategy.dp_rank,
            world_size=self.strategy.dp_world_size,
        )
        self.callback_handler.eval_dataloader = loader
        return loader

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        return build_eval_dataloader(
            self._prepare_dataset(test_dataset, "test"),
            self.args,
            self.data_collator,
            rank=self.strategy.dp_rank,
            world_size=self.strategy.dp_world_size,
        )

    # -- evaluate and predict ------------------------------------------------------------------------
    def model_for_eval(self) -> nn.Module:
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        return full_eval_model(model, self.args, getattr(self, "is_in_train", False))

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            metrics: dict[str, float] = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        start = time.perf_counter()
        memory = MemoryTracker(not self.args.skip_memory_metrics).start(metric_key_prefix)
        loader = self.get_eval_dataloader(dataset)
        with torch.no_grad(), optimizer_eval_mode(getattr(self, "optimizer", None)):
            # As transformers: without compute_metrics there is nothing to keep logits for.
            loss_only = True if self.compute_metrics is None else None
            output = run_evaluation_loop(
                self, loader, "Evaluation", loss_only, ignore_keys, metric_key_prefix
            )
        metrics = output.metrics or {}
        metrics.update(speed_metrics(metric_key_prefix, start, output.num_samples, _num_batches(loader)))
        metrics.update(memory.stop(metric_key_prefix))
        self.log(metrics)
        self._fire("on_evaluate", metrics=metrics)
        self.model_wrapped.train()
        return metrics

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        start = time.perf_counter()
        memory = MemoryTracker(not self.args.skip_memory_metrics).start(metric_key_prefix)
        loader = self.get_test_dataloader(test_dataset)
        with torch.no_grad(), optimizer_eval_mode(getattr(self, "optimizer", None)):
            output: EvalLoopOutput = run_evaluation_loop(
                self, loader, "Prediction", None, ignore_keys, metric_key_prefix
            )
        metrics = output.metrics or {}
        metrics.update(speed_metrics(metric_key_prefix, start, output.num_samples, _num_batches(loader)))
        metrics.update(memory.stop(metric_key_prefix))
        self._fire("on_predict", metrics=metrics)
        return PredictionOutput(output.predictions, output.label_ids, metrics)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """(loss, logits, labels) of one batch, without gradients."""
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        inputs = self._prepare_inputs(inputs)
        labels = labels_of(inputs, self.label_names) if has_labels else None
        ignore = ignore_keys if ignore_keys is not None else ignore_keys_at_inference(model)
        with torch.no_grad(), self.precision.autocast():
            if has_labels:
                loss, outputs = self.compute_loss(model, dict(inputs), return_outputs=True)
                loss = loss.mean().detach()
            else:
                loss, outputs = None, model(**inputs)
        if prediction_loss_only:
            return loss, None, None
        return loss, logits_without(outputs, ignore), labels

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The loop behind evaluate() and predict(), for subclasses that call it directly."""
        with torch.no_grad(), optimizer_eval_mode(getattr(self, "optimizer", None)):
            return run_evaluation_loop(
                self,
                dataloader,
                description,
                prediction_loss_only,
                ignore_keys,
                metric_key_prefix,
            )

    # -- evaluation during training ------------------------------------------------------------------
    def _evaluate(self, ignore_keys: list[str] | None) -> dict[str, float]:
        metrics = self.evaluate(ignore_keys=ignore_keys)
        if self.scheduler_waits_for_metrics:
            key = self.args.metric_for_best_model or "loss"
            key = key if key.startswith("eval_") else f"eval_{key}"
            if key not in metrics:
                raise KeyError(
                    f"ReduceLROnPlateau steps on `{key}`, which evaluate() did not return; "
                    f"set metric_for_best_model to one of {sorted(metrics)}."
                )
            self.lr_scheduler.step(metrics[key])
        return metrics

    def _is_new_best(self, metrics: dict[str, float] | None) -> bool:
        if not metrics or self.args.metric_for_best_model is None:
            return False
        key = self.args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        value = checks.best_metric_value(metrics, key)
        if value is None:  # NaN: never the best
            return False
        better = (lambda a, b: a > b) if self.args.greater_is_better else (lambda a, b: a < b)
        if self.state.best_metric is None or better(value, self.state.best_metric):
            self.state.best_metric = value
            self.state.best_global_step = self.state.global_step
            return True
        return False


def _num_batches(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
