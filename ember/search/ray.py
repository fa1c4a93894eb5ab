"""The Ray Tune backend of `Trainer.hyperparameter_search` (`backend="ray"`, `pip install 'ember[ray]'`).

As in transformers: `hp_space(None)` returns the search space as Ray Tune distributions
(`tune.loguniform(...)`), every keyword goes to `ray.tune.run` (`scheduler`, `search_alg`,
`resources_per_trial`, `storage_path`, ...), and each trial runs in a Ray worker on a copy of the
trainer, whose model `model_init` builds there. Every evaluation reports the eval metrics and
`objective`, so a scheduler (ASHA, median stopping) can stop a bad trial at that evaluation.
The best run's `run_summary` is Ray's `ExperimentAnalysis`; its `run_id` is the Ray trial id, and
the trial's files are in `output_dir/run-{trial_id}`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ember.search import BestRun, TrialRun, check_space_names, run_trial

__all__ = ["default_hp_space", "run"]


def _import_tune() -> Any:
    try:
        from ray import tune
    except ImportError:
        raise ImportError(
            "hyperparameter_search(backend='ray') needs Ray Tune: `pip install 'ray[tune]'` "
            "(or `pip install 'ember[ray]'`)."
        ) from None
    return tune


def default_hp_space(trial: Any) -> dict[str, Any]:
    """transformers' default search space, as Ray Tune distributions."""
    tune = _import_tune()
    return {
        "learning_rate": tune.loguniform(1e-6, 1e-4),
        "num_train_epochs": tune.choice(list(range(1, 6))),
        "seed": tune.uniform(1, 40),
        "per_device_train_batch_size": tune.choice([4, 8, 16, 32, 64]),
    }


def _config_values(config: dict[str, Any]) -> dict[str, Any]:
    # In a worker the trial *is* its sampled config.
    return dict(config)


def _trainable(config: dict[str, Any], search: TrialRun) -> None:
    tune = _import_tune()

    def report(objective: float, step: int, metrics: dict[str, float]) -> bool:
        tune.report({**metrics, "objective": objective, "step": step})
        return False  # Ray's scheduler stops the worker itself

    result = run_trial(search, config, tune.get_context().get_trial_id(), report)
    if not result.reported:
        tune.report({"objective": float(result.objective), "step": result.global_step, "done": True})


def _check_concurrency(kwargs: dict[str, Any]) -> None:
    # Ray applies `max_concurrent_trials` only by wrapping a `Searcher`; with a search generator
    # (BasicVariantGenerator) it only logs a warning and runs as many trials at once as the
    # resources allow, so a search that relies on the limit (e.g. for ASHA's order) silently differs.
    from ray.tune.search import Searcher

    search_alg = kwargs.get("search_alg")
    if (
        kwargs.get("max_concurrent_trials")
        and search_alg is not None
        and not isinstance(search_alg, (str, Searcher))
    ):
        raise ValueError(
            f"max_concurrent_trials is ignored by Ray with search_alg={type(search_alg).__name__}; "
            "set the limit on the search algorithm instead "
            "(e.g. `BasicVariantGenerator(max_concurrent=N)`) and drop max_concurrent_trials."
        )


def run(search: TrialRun, n_trials: int, direction: str | list[str], **kwargs: Any) -> BestRun:
    tune = _import_tune()
    if isinstance(direction, list):
        raise ValueError(
            "backend='ray' optimises one objective; use backend='optuna' for several directions."
        )
    _check_concurrency(kwargs)
    mode = direction[:3]  # "min" / "max"
    trainer = search.trainer
    kwargs.setdefault("resources_per_trial", {"cpu": 1, "gpu": 1 if torch.cuda.is_available() else 0})
    # As with optuna in ember: a failed trial is recorded, and the best of the others is returned.
    kwargs.setdefault("raise_on_failed_trial", False)
    # Ray refuses `metric` twice: set it here only when the scheduler and search algorithm have none.
    if not any(getattr(kwargs.get(key), "_metric", None) for key in ("scheduler", "search_alg")):
        kwargs.setdefault("metric", "objective")
        kwargs.setdefault("mode", mode)
    space = search.hp_space(None)
    check_space_names(space, trainer.args)  # here, not in every worker
    saved = trainer.args, trainer.model, trainer.model_wrapped, trainer.optimizer, trainer.lr_scheduler
    handler_model = trainer.callback_handler.model
    # Workers get a copy of the trainer: without the model (model_init builds it there), and with
    # an absolute output_dir, since Ray runs each trial in its own working directory.
    trainer.args = dataclasses.replace(trainer.args, output_dir=os.path.abspath(trainer.args.output_dir))
    trainer.model = trainer.model_wrapped = trainer.callback_handler.model = None  # type: ignore[assignment]
    trainer.optimizer = trainer.lr_scheduler = None
    worker_search = dataclasses.replace(search, hp_space=_config_values)
    try:
        analysis = tune.run(
            tune.with_parameters(_trainable, search=worker_search),
            config=space,
            num_samples=n_trials,
            **kwargs,
        )
    finally:
        trainer.args, trainer.model, trainer.model_wrapped, trainer.optimizer, trainer.lr_scheduler = saved
        trainer.callback_handler.model = handler_model
    best = analysis.get_best_trial(metric="objective", mode=mode, scope=os.environ.get("RAY_SCOPE", "last"))
    if best is None:
        states = [t.status for t in analysis.trials]
        raise RuntimeError(f"no Ray Tune trial reported an objective (states: {states}); see Ray's log.")
    return BestRun(best.trial_id, best.last_result["objective"], dict(best.config), analysis)
