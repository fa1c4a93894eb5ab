"""The optuna backend of `Trainer.hyperparameter_search` (the default backend).

Each evaluation during a trial is reported with `trial.report(objective, global_step)`; when the
study's pruner says so, training stops at that step and the trial is marked pruned. A trial that
raises is recorded as failed and the search goes on (`catch`, default: any Exception); a NaN
objective fails the trial as optuna always does. A search space that TrainingArguments rejects stops
the whole search with that error, since every trial would fail the same way.
"""

from __future__ import annotations

from typing import Any

from ember.search import (
    BestRun,
    Reporter,
    SearchSpaceError,
    TrialRun,
    default_hp_space_optuna,
    run_trial,
)

__all__ = ["default_hp_space", "run"]

default_hp_space = default_hp_space_optuna
# study.optimize's keywords; every other keyword goes to optuna.create_study.
_OPTIMIZE_KEYS = ("timeout", "n_jobs", "gc_after_trial", "catch", "callbacks", "show_progress_bar")


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ImportError(
            "hyperparameter_search(backend='optuna') needs optuna: `pip install optuna` "
            "(or `pip install 'ember[search]'`)."
        ) from None
    return optuna


def run(
    search: TrialRun, n_trials: int, direction: str | list[str], **kwargs: Any
) -> BestRun | list[BestRun]:
    optuna = _import_optuna()
    optimize = {key: kwargs.pop(key) for key in _OPTIMIZE_KEYS if key in kwargs}
    optimize.setdefault("catch", (Exception,))
    if optimize.get("n_jobs", 1) != 1:
        raise ValueError(
            f"n_jobs={optimize['n_jobs']}: trials share one Trainer and run one at a time; use n_jobs=1."
        )
    multi = isinstance(direction, list)
    study = optuna.create_study(
        direction=None if multi else direction, directions=direction if multi else None, **kwargs
    )
    space_errors: list[SearchSpaceError] = []

    def objective(trial: Any) -> Any:
        try:
            # optuna's report/should_prune take one objective only, so multi-objective never prunes.
            result = run_trial(search, trial, trial.number, None if multi else _reporter(trial))
        except SearchSpaceError as err:
            space_errors.append(err)
            trial.study.stop()
            raise
        trial.set_user_attr("global_step", result.global_step)
        trial.set_user_attr("output_dir", result.output_dir)
        if result.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {result.pruned_at}")
        return [float(v) for v in result.objective] if multi else float(result.objective)

    study.optimize(objective, n_trials=n_trials, **optimize)
    if space_errors:
        raise space_errors[0]
    return _best_runs(study, multi, optuna)


def _reporter(trial: Any) -> Reporter:
    def report(objective: float, step: int, metrics: dict[str, float]) -> bool:
        trial.report(objective, step)
        return bool(trial.should_prune())

    return report


def _best_runs(study: Any, multi: bool, optuna: Any) -> BestRun | list[BestRun]:
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        states = [t.state.name for t in study.trials]
        raise RuntimeError(
            f"no trial completed (states: {states}); see the warnings above for why trials failed."
        )
    if multi:
        return [BestRun(str(t.number), list(t.values), dict(t.params)) for t in study.best_trials]
    best = study.best_trial
    return BestRun(str(best.number), float(best.value), dict(best.params))
