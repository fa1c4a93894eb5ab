"""Hyperparameter search behind `Trainer.hyperparameter_search` (transformers' interface).

One trial, whatever the backend:

    params   = hp_space(trial)                                  the backend suggests values
    args     = base args with params, output_dir/run-{number}   validated like any TrainingArguments
    trainer.train(trial=trial)          model_init -> fresh model; fresh optimizer, scheduler,
                                        TrainerState and data order (all seeded from args.seed)
      each evaluate -> objective -> backend.report(objective, step) -> maybe stop early (pruned)
    objective = the last evaluation's (or one more evaluate() when training never evaluated)

The backend (a module named in `SEARCH_BACKENDS`: optuna, Ray Tune) owns the study; this module
owns what a trial does to the trainer, so every backend shares it. Only one process runs a search
(Ray's trials run in its workers, each on a copy of the trainer).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ember.args.training_args import TrainingArguments, check_field_names
from ember.callbacks.events import TrainerCallback

# The Trainer, typed loosely: its hyperparameter_search (trainer/trainer.py) imports this module,
# which must not import it back (not even for types: the import graph of ember/ has no cycle).
Trainer = Any

__all__ = [
    "SEARCH_BACKENDS",
    "BestRun",
    "Reporter",
    "SearchSpaceError",
    "TrialResult",
    "TrialRun",
    "check_space_names",
    "default_compute_objective",
    "default_hp_space_optuna",
    "hyperparameter_search",
    "run_trial",
    "trial_arguments",
]

logger = logging.getLogger("ember")

# Backend name -> module with `run(search: TrialRun, n_trials, direction, **kwargs)`.
SEARCH_BACKENDS: dict[str, str] = {
    "optuna": "ember.search.optuna",
    "ray": "ember.search.ray",
}
_NOT_SHIPPED = {
    "wandb": "ember has no W&B sweeps backend yet",
    "sigopt": "SigOpt was retired",
}


class BestRun(NamedTuple):
    """The best trial of a search; `run_id` names its folder `output_dir/run-{run_id}`."""

    run_id: str
    objective: float | list[float]
    hyperparameters: dict[str, Any]
    run_summary: Any | None = None


class SearchSpaceError(ValueError):
    """The search space sets something TrainingArguments rejects; every trial would fail alike."""


def default_compute_objective(metrics: Mapping[str, float]) -> float:
    """The eval loss when evaluation returns no other metric, else the sum of the metrics
    (speed metrics and `epoch` left out), as transformers does."""
    rest = {
        key: value
        for key, value in metrics.items()
        if key not in ("eval_loss", "epoch") and not key.endswith(("_runtime", "_per_second"))
    }
    if rest:
        return float(sum(rest.values()))
    if "eval_loss" not in metrics:
        raise KeyError(
            f"the default objective needs `eval_loss` or other metrics, got {sorted(metrics)}; "
            "pass compute_objective=... to hyperparameter_search."
        )
    return float(metrics["eval_loss"])


def default_hp_space_optuna(trial: Any) -> dict[str, Any]:
    """transformers' default search space (an optuna trial suggests each value)."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 5),
        "seed": trial.suggest_int("seed", 1, 40),
        "per_device_train_batch_size": trial.suggest_categorical(
            "per_device_train_batch_size", [4, 8, 16, 32, 64]
        ),
    }


def check_space_names(names: Iterable[str], args: TrainingArguments) -> None:
    """SearchSpaceError naming the first search-space key that is not a TrainingArguments field."""
    try:
        check_field_names(names, type(args))
    except ValueError as err:
        raise SearchSpaceError(f"hp_space: {err}") from None


def trial_arguments(base: TrainingArguments, params: Mapping[str, Any], output_dir: str) -> TrainingArguments:
    """`base` with the trial's values and `output_dir`, checked as a new TrainingArguments would be.

    Built from `base` every time, so one trial's values never leak into the next.
    """
    if not isinstance(params, Mapping):
        raise SearchSpaceError(
            f"hp_space must return a dict of TrainingArguments fields, got {type(params).__name__}."
        )
    check_space_names(params, base)
    values = {name: _like(getattr(base, name), value) for name, value in params.items()}
    try:
        return dataclasses.replace(base, **values, output_dir=output_dir)
    except ValueError as err:
        raise SearchSpaceError(f"hp_space gave a value TrainingArguments rejects: {err}") from None


def _like(current: Any, value: Any) -> Any:
    # As transformers: a float drawn for an integer field (Ray's default space draws the seed
    # from tune.uniform(1, 40)) is truncated to an int.
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        return int(value)
    return value


class Reporter(Protocol):
    def __call__(self, objective: float, step: int, metrics: dict[str, float]) -> bool:
        """Send an intermediate objective to the backend; True means stop this trial (pruned)."""


class _TrialCallback(TrainerCallback):
    """Turns each evaluation into an intermediate objective and stops training when told to."""

    def __init__(self, compute_objective: Callable[[dict[str, float]], Any], report: Reporter | None):
        self.compute_objective, self.report = compute_objective, report
        self.objective: Any = None
        self.pruned_at: int | None = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if not metrics:
            return
        self.objective = self.compute_objective(dict(metrics))
        if self.report is not None and self.report(float(self.objective), state.global_step, dict(metrics)):
            self.pruned_at = state.global_step
            control.should_training_stop = True


@dataclasses.dataclass
class TrialRun:
    """What a backend needs to run trials on one trainer."""

    trainer: Trainer
    hp_space: Callable[[Any], dict[str, Any]]
    compute_objective: Callable[[dict[str, float]], Any]
    hp_name: Callable[[Any], str] | None = None

    def run_name(self, trial: Any, number: int | str) -> str:
        return self.hp_name(trial) if self.hp_name is not None else f"run-{number}"


@dataclasses.dataclass
class TrialResult:
    objective: Any
    pruned_at: int | None
    global_step: int
    output_dir: str
    reported: bool  # whether the objective was reported during training (it evaluated)


def run_trial(search: TrialRun, trial: Any, number: int | str, report: Reporter | None = None) -> TrialResult:
    """Train once with the trial's values in `output_dir/run-{number}`; the trainer's arguments
    are put back afterwards, whatever happens."""
    trainer = search.trainer
    base = trainer.args
    run_dir = str(Path(base.output_dir) / search.run_name(trial, number))
    args = trial_arguments(base, search.hp_space(trial), run_dir)
    watcher = _TrialCallback(search.compute_objective, report)
    trainer.add_callback(watcher)
    label_names = trainer.label_names
    _use_arguments(trainer, args)
    try:
        trainer.train(trial=trial)
        trainer.remove_callback(watcher)
        objective, reported = watcher.objective, watcher.objective is not None
        if not reported:  # as transformers: evaluate once when training never did
            objective = search.compute_objective(trainer.evaluate())
        trainer.objective = objective
        return TrialResult(objective, watcher.pruned_at, trainer.state.global_step, run_dir, reported)
    finally:
        trainer.remove_callback(watcher)
        _use_arguments(trainer, base)
        trainer.label_names = label_names


def _use_arguments(trainer: Trainer, args: TrainingArguments) -> None:
    from ember.strategy.precision import build_precision

    trainer.args = args
    # Parts that read the arguments once, at construction.
    trainer.precision = build_precision(args, trainer.strategy.device)
    if args.label_names:
        trainer.label_names = list(args.label_names)


def hyperparameter_search(
    trainer: Trainer,
    hp_space: Callable[[Any], dict[str, Any]] | None = None,
    compute_objective: Callable[[dict[str, float]], Any] | None = None,
    n_trials: int = 20,
    direction: str | list[str] = "minimize",
    backend: str | None = None,
    hp_name: Callable[[Any], str] | None = None,
    **kwargs: Any,
) -> BestRun | list[BestRun]:
    """See `Trainer.hyperparameter_search`."""
    name = _check_search(trainer, n_trials, direction, backend)
    module = importlib.import_module(SEARCH_BACKENDS[name])
    search = TrialRun(
        trainer,
        hp_space if hp_space is not None else module.default_hp_space,
        compute_objective if compute_objective is not None else default_compute_objective,
        hp_name,
    )
    trainer.hp_search_backend = name
    try:
        result: BestRun | list[BestRun] = module.run(search, n_trials, direction, **kwargs)
    finally:
        trainer.hp_search_backend = None
    return result


def _check_search(trainer: Trainer, n_trials: int, direction: Any, backend: str | None) -> str:
    if trainer.model_init is None:
        raise RuntimeError(
            "hyperparameter_search needs a fresh model per trial: pass `model_init=` (a function "
            "returning the model, optionally taking the trial) to Trainer(...) instead of `model=`."
        )
    if trainer.strategy.world_size > 1:
        raise RuntimeError(
            "hyperparameter_search runs in one process; launch the search without torchrun/"
            "deepspeed (distributed trials are not supported yet)."
        )
    name = str(getattr(backend, "value", backend) or "optuna")
    if name in _NOT_SHIPPED:
        raise ValueError(f"backend={name!r}: {_NOT_SHIPPED[name]}; use backend='optuna' or 'ray'.")
    if name not in SEARCH_BACKENDS:
        raise ValueError(
            f"backend={name!r} is not a search backend; choose one of {sorted(SEARCH_BACKENDS)}."
        )
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}.")
    for one in direction if isinstance(direction, list) else [direction]:
        if one not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize' (or a list of them), got {one!r}.")
    return name
