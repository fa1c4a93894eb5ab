"""Checks of what a run is given, made before the work they protect starts.

Each one turns a silent wrong run, or an error deep inside torch, into a message that names the
cause and the fix: a plan of zero steps, an output folder nobody can write, metrics that cannot
rank checkpoints. Input data is checked in `data/checks.py`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..args.parser import parses_as_float

logger = logging.getLogger("ember")


def check_trainer_inputs(
    model: Any, model_init: Any, optimizers: tuple[Any, Any], optimizer_cls_and_kwargs: Any
) -> None:
    """At Trainer construction: a model to train, and at most one way to choose its optimizer."""
    if model is None and model_init is None:
        raise ValueError("Trainer needs `model` or `model_init`; pass one of them.")
    if optimizer_cls_and_kwargs is not None and optimizers[0] is not None:
        raise ValueError("Pass either `optimizers` or `optimizer_cls_and_kwargs`, not both.")


def check_output_dir_writable(output_dir: str) -> None:
    """At train start: `output_dir` (or the folder it will be made in) must accept files."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`output_dir`={output_dir!r} is a file; point output_dir at a folder.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"`output_dir`={output_dir!r} cannot be written ({existing} is not writable by this user); "
            "choose a folder you can write to, or fix its permissions, before training."
        )


def check_plan(args: Any, max_steps: int) -> None:
    """At train start, once the number of optimizer steps is known."""
    if max_steps <= 0:
        raise ValueError(
            f"This run would train for 0 steps (max_steps={args.max_steps}, "
            f"num_train_epochs={args.num_train_epochs}); set max_steps > 0 or num_train_epochs > 0."
        )
    warmup = args.get_warmup_steps(max_steps)
    if warmup > max_steps:
        logger.warning(
            "ember: warmup lasts %d steps but the run has only %d: the learning rate never reaches "
            "learning_rate=%g. Lower warmup_steps (or use a ratio < 1).",
            warmup,
            max_steps,
            args.learning_rate,
        )


def check_resume_position(global_step: int, max_steps: int, checkpoint: str) -> None:
    """After loading a checkpoint: a run already at or past its end has nothing left to do."""
    if global_step > max_steps:
        raise ValueError(
            f"The checkpoint {checkpoint} is at step {global_step}, past this run's max_steps={max_steps}; "
            "raise max_steps (or num_train_epochs) to train further, or load the checkpoint's model "
            "for evaluation instead of resuming."
        )
    if global_step == max_steps:
        logger.warning(
            "ember: the checkpoint %s is at step %d, which is this run's max_steps: training has nothing "
            "left to do. Raise max_steps (or num_train_epochs) to train further.",
            checkpoint,
            global_step,
        )


def check_eval_dataset_not_empty(dataset: Any, name: str = "eval_dataset") -> None:
    try:
        size = len(dataset)
    except TypeError:
        return  # an iterable of unknown length
    if size == 0:
        raise ValueError(
            f"`{name}` is empty, so evaluation would report no eval_loss and no metrics; pass a "
            "non-empty eval dataset, or set eval_strategy='no' and do not call evaluate()."
        )


def check_eval_sets_before_training(args: Any, eval_dataset: Any) -> None:
    """At train() start: the eval sets training will evaluate on must hold examples.

    Found at the first evaluation instead, the error would come after steps (and hours) were spent.
    """
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    evaluates = strategy not in ("no", None) or args.eval_on_start
    if not evaluates or eval_dataset is None:
        return
    named = eval_dataset if isinstance(eval_dataset, Mapping) else {"": eval_dataset}
    for key, dataset in named.items():
        name = f"eval_dataset[{key!r}]" if key else "eval_dataset"
        try:
            size = len(dataset)
        except TypeError:
            continue  # an iterable of unknown length
        if size == 0:
            raise ValueError(
                f"`{name}` is empty, and this run evaluates during training "
                f"(eval_strategy={strategy!r}, eval_on_start={args.eval_on_start}); "
                "pass a non-empty eval dataset, or set eval_strategy='no'. Checked before any step."
            )


def checked_metrics(metrics: Any) -> dict[str, Any]:
    """What `compute_metrics` returned, refused if it cannot be logged as name -> number."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"compute_metrics returned a {type(metrics).__name__}; it must return a dict of metric "
            "name -> number, e.g. {'accuracy': 0.91}."
        )
    for key, value in metrics.items():
        size = value.numel() if isinstance(value, torch.Tensor) else np.size(value)
        if isinstance(value, np.ndarray | torch.Tensor | list | tuple) and size != 1:
            raise ValueError(
                f"compute_metrics returned an array of shape {tuple(np.shape(value))} for {key!r}; "
                "each metric must be one number: reduce it (e.g. .mean()) or return its items under "
                "separate keys."
            )
    return dict(metrics)


def best_metric_value(metrics: Mapping[str, Any], key: str) -> float | None:
    """The value that ranks checkpoints, or None when it is NaN (a NaN never becomes the best)."""
    if key not in metrics:
        raise KeyError(
            f"metric_for_best_model `{key}` is not among the eval metrics {sorted(metrics)}; "
            "set metric_for_best_model to one of them (or make compute_metrics return it)."
        )
    value = metrics[key]
    if isinstance(value, str | bytes) or not parses_as_float(value):
        raise TypeError(
            f"metric_for_best_model `{key}` is {value!r}, which cannot be compared; make compute_metrics "
            "return a number for it, or rank by another metric."
        )
    number = float(value)
    if math.isnan(number):
        logger.warning("ember: %s is NaN at this evaluation; it is not taken as the best model.", key)
        return None
    return number
