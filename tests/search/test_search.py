"""`Trainer.hyperparameter_search` with the real optuna on a tiny regression (y = 2x + 3).

The task is built so the answer is clear: in 40 AdamW steps a learning rate near 1e-1 fits the
line, while 1e-4 barely moves (eval loss ~10 against ~0.1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.search import (
    BestRun,
    SearchSpaceError,
    default_compute_objective,
    default_hp_space_optuna,
    trial_arguments,
)
from tests.helpers import RegressionDataset, RegressionModel

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

MAX_STEPS, EVAL_STEPS = 40, 10


def make_trainer(output_dir: Path, model_init: Any = None, **overrides: Any) -> Trainer:
    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=EVAL_STEPS,
        logging_steps=EVAL_STEPS,
        save_strategy="no",
        disable_tqdm=True,
        report_to="jsonl",  # the tests read each trial's logs.jsonl
    )
    values.update(overrides)
    return Trainer(
        model_init=model_init or (lambda: RegressionModel()),
        args=TrainingArguments(**values),
        train_dataset=RegressionDataset(64),
        eval_dataset=RegressionDataset(32, seed=1),
    )


def lr_space(trial: Any) -> dict[str, Any]:
    return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 3e-1, log=True)}


def last_step(run_dir: Path) -> int:
    lines = (run_dir / "logs.jsonl").read_text().splitlines()
    return int(json.loads(lines[-1])["step"])


def search_study(trainer: Trainer, name: str, **kwargs: Any) -> tuple[Any, Any]:
    """Run a search into an in-memory storage and load the study back, to see every trial."""
    storage = optuna.storages.InMemoryStorage()
    best = trainer.hyperparameter_search(storage=storage, study_name=name, **kwargs)
    return best, optuna.load_study(study_name=name, storage=storage)


def test_search_finds_the_learning_rate_region_the_grid_shows(tmp_path: Path) -> None:
    grid = {}
    for lr in (1e-4, 1e-3, 1e-2, 1e-1):
        trainer = make_trainer(tmp_path / f"grid-{lr}", learning_rate=lr)
        trainer.train()
        grid[lr] = trainer.evaluate()["eval_loss"]
    grid_best = min(grid, key=grid.__getitem__)
    assert grid_best == 1e-1 and grid[1e-1] < grid[1e-4] / 20  # the task has a clear answer

    trainer = make_trainer(tmp_path / "search")
    best = trainer.hyperparameter_search(
        hp_space=lr_space, n_trials=10, sampler=optuna.samplers.TPESampler(seed=0)
    )
    assert isinstance(best, BestRun) and best.run_summary is None
    assert set(best.hyperparameters) == {"learning_rate"}
    # Within a factor of 5 of the grid's best, and at least as good as the grid's best point.
    assert abs(math.log10(best.hyperparameters["learning_rate"] / grid_best)) < math.log10(5)
    assert best.objective <= grid[grid_best] * 1.5
    for n in range(10):
        assert (tmp_path / "search" / f"run-{n}" / "logs.jsonl").is_file()
    # The best run's folder holds its own log, whose last evaluation is the objective.
    evals = [
        json.loads(line)
        for line in (tmp_path / "search" / f"run-{best.run_id}" / "logs.jsonl").read_text().splitlines()
        if "eval_loss" in line
    ]
    assert evals[-1]["eval_loss"] == pytest.approx(best.objective)
    assert trainer.args.output_dir == str(tmp_path / "search")  # the base arguments are back


def test_the_same_sampler_seed_gives_the_same_best_trial(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tmp_path / name)
        runs.append(
            trainer.hyperparameter_search(
                hp_space=lr_space, n_trials=8, sampler=optuna.samplers.TPESampler(seed=0)
            )
        )
    assert runs[0] == runs[1]  # same run_id, same values, bit-identical objective


def test_pruned_trials_stop_at_the_evaluation_that_pruned_them(tmp_path: Path) -> None:
    def space(trial: Any) -> dict[str, Any]:
        return {"learning_rate": trial.suggest_categorical("learning_rate", [1e-4, 1e-1])}

    trainer = make_trainer(tmp_path)
    # Any trial whose eval loss is above 3 at an evaluation is pruned there: lr 1e-4 (loss ~10).
    best, study = search_study(
        trainer,
        "prune",
        hp_space=space,
        n_trials=6,
        pruner=optuna.pruners.ThresholdPruner(upper=3.0),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    states = {t.number: (t.state, t.params["learning_rate"]) for t in study.trials}
    pruned = [n for n, (state, _) in states.items() if state == optuna.trial.TrialState.PRUNED]
    complete = [n for n, (state, _) in states.items() if state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 6
    for n in pruned:
        assert states[n][1] == 1e-4
        assert last_step(tmp_path / f"run-{n}") == EVAL_STEPS  # stopped at the first evaluation
        assert study.trials[n].user_attrs["global_step"] == EVAL_STEPS
        assert study.trials[n].intermediate_values == {EVAL_STEPS: pytest.approx(10, rel=0.3)}
    for n in complete:
        assert states[n][1] == 1e-1
        assert last_step(tmp_path / f"run-{n}") == MAX_STEPS
        assert sorted(study.trials[n].intermediate_values) == [10, 20, 30, 40]
    assert best.hyperparameters == {"learning_rate": 1e-1}


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    def model_init(trial: Any) -> torch.nn.Module:
        if trial is not None and trial.number == 1:
            raise RuntimeError("out of memory (simulated)")
        return RegressionModel()

    evaluations: list[float] = []

    def objective(metrics: dict[str, float]) -> float:
        evaluations.append(metrics["eval_loss"])
        # A diverged run: NaN at the last evaluation of the third trial (two evaluations a trial).
        return float("nan") if len(evaluations) == 4 else metrics["eval_loss"]

    trainer = make_trainer(tmp_path, model_init=model_init, max_steps=20)
    best, study = search_study(
        trainer,
        "fail",
        hp_space=lr_space,
        compute_objective=objective,
        n_trials=4,
        pruner=optuna.pruners.NopPruner(),
    )
    states = [t.state for t in study.trials]
    fail, complete = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    assert states == [complete, fail, fail, complete]
    assert best.run_id in ("0", "3")
    assert not (tmp_path / "run-1" / "logs.jsonl").exists()  # failed before training
    # catch=() restores optuna's (and transformers') default: the first error ends the search.
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.hyperparameter_search(hp_space=lr_space, n_trials=4, catch=())


def test_each_trial_starts_fresh_with_its_own_arguments(tmp_path: Path) -> None:
    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[tuple[Any, ...]] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]
            self.begins.append(
                (
                    state.global_step,
                    len(state.log_history),
                    state.best_metric,
                    args.learning_rate,
                    args.seed,
                    args.output_dir,
                    id(model),
                    id(kwargs["optimizer"]),
                    float(model.out.bias.detach()),
                )
            )

    def space(trial: Any) -> dict[str, Any]:
        return {**lr_space(trial), "seed": trial.suggest_int("seed", 1, 40)}

    trainer = make_trainer(tmp_path, metric_for_best_model="loss")
    recorder = Recorder()
    trainer.add_callback(recorder)
    best, study = search_study(
        trainer, "fresh", hp_space=space, n_trials=3, sampler=optuna.samplers.RandomSampler(seed=3)
    )
    assert len(recorder.begins) == 3
    for trial, begin in zip(study.trials, recorder.begins):
        step, history, best_metric, lr, seed, out, *_ = begin
        assert (step, history, best_metric) == (0, 0, None)
        assert (lr, seed) == (trial.params["learning_rate"], trial.params["seed"])
        assert out == str(tmp_path / f"run-{trial.number}")
    assert len({b[6] for b in recorder.begins}) == 3 and len({b[7] for b in recorder.begins}) == 3
    # The initial weights follow each trial's seed (model_init runs after seeding).
    torch.manual_seed(study.trials[0].params["seed"])
    assert recorder.begins[0][8] == float(RegressionModel().out.bias.detach())
    assert trainer.args.learning_rate == 5e-5 and trainer.args.seed == 42  # restored


def test_model_init_receives_the_trial(tmp_path: Path) -> None:
    widths: list[int] = []

    def model_init(trial: Any) -> torch.nn.Module:
        model = RegressionModel()
        widths.append(trial.suggest_int("width", 2, 8) if trial is not None else -1)
        return model

    trainer = make_trainer(tmp_path, model_init=model_init, max_steps=10)
    best = trainer.hyperparameter_search(hp_space=lr_space, n_trials=2, hp_name=lambda t: f"trial-{t.number}")
    assert isinstance(best, BestRun) and set(best.hyperparameters) == {"learning_rate", "width"}
    assert -1 in widths and len(widths) == 3  # once at construction, then once per trial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial-0", "trial-1"]  # hp_name names the runs


def test_multi_objective_returns_the_pareto_front(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=20)
    best = trainer.hyperparameter_search(
        hp_space=lr_space,
        compute_objective=lambda m: [m["eval_loss"], m["eval_loss"] ** 0.5],
        n_trials=4,
        direction=["minimize", "maximize"],
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    assert isinstance(best, list) and best
    for run in best:
        assert isinstance(run, BestRun) and len(run.objective) == 2
        assert run.objective[1] == pytest.approx(run.objective[0] ** 0.5)
        assert (tmp_path / f"run-{run.run_id}").is_dir()


def test_the_default_space_and_objective_match_transformers(tmp_path: Path) -> None:
    from transformers.trainer_utils import default_compute_objective as hf_objective
    from transformers.trainer_utils import default_hp_space_optuna as hf_space

    for metrics in (
        {"eval_loss": 0.5, "eval_runtime": 1.0, "eval_samples_per_second": 3.0, "epoch": 2.0},
        {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_f1": 0.5, "eval_steps_per_second": 9.0},
    ):
        assert default_compute_objective(metrics) == hf_objective(metrics)
    ours, theirs = optuna.create_study().ask(), optuna.create_study().ask()
    default_hp_space_optuna(ours), hf_space(theirs)
    assert ours.distributions == theirs.distributions

    trainer = make_trainer(tmp_path, max_steps=5, eval_strategy="no")
    best = trainer.hyperparameter_search(n_trials=2)  # default space; evaluates once after training
    assert set(best.hyperparameters) == set(theirs.distributions)
    assert math.isfinite(best.objective)


def test_a_misspelled_field_in_the_space_stops_the_search_naming_it(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    with pytest.raises(SearchSpaceError, match=r"`learning_rat`.*Did you mean 'learning_rate'"):
        trainer.hyperparameter_search(
            hp_space=lambda t: {"learning_rat": t.suggest_float("learning_rat", 1e-4, 1e-1)}, n_trials=5
        )
    assert not list(tmp_path.glob("run-*"))  # nothing trained
    with pytest.raises(SearchSpaceError, match="per_device_train_batch_size"):
        trainer.hyperparameter_search(hp_space=lambda t: {"per_device_train_batch_size": 0}, n_trials=2)


def test_search_without_model_init_or_with_an_unknown_backend_is_an_error(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, disable_tqdm=True)
    trainer = Trainer(model=RegressionModel(), args=args, train_dataset=RegressionDataset(8))
    with pytest.raises(RuntimeError, match="model_init"):
        trainer.hyperparameter_search(n_trials=2)
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="backend='wandb'.*'optuna' or 'ray'"):
        trainer.hyperparameter_search(backend="wandb")
    with pytest.raises(ValueError, match="backend='tpe' is not a search backend"):
        trainer.hyperparameter_search(backend="tpe")
    with pytest.raises(ValueError, match="direction"):
        trainer.hyperparameter_search(direction="min")
    with pytest.raises(ValueError, match="n_jobs"):
        trainer.hyperparameter_search(n_jobs=2)


def test_trial_arguments_are_validated_copies(tmp_path: Path) -> None:
    base = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=10)
    args = trial_arguments(base, {"seed": 23.7, "learning_rate": 0.1}, str(tmp_path / "run-3"))
    assert (args.seed, args.learning_rate, args.output_dir) == (23, 0.1, str(tmp_path / "run-3"))
    assert (base.seed, base.learning_rate) == (42, 5e-5)  # the base is untouched
    with pytest.raises(SearchSpaceError, match="lr_scheduler_type"):
        trial_arguments(base, {"lr_scheduler_type": "cosine_wobble"}, str(tmp_path))
    with pytest.raises(SearchSpaceError, match="dict"):
        trial_arguments(base, [("learning_rate", 0.1)], str(tmp_path))  # type: ignore[arg-type]
