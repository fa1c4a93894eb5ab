"""`hyperparameter_search(backend="ray")` with the real Ray Tune on the tiny regression of test_search.

One search (Ray starts slowly on a small machine): ASHA stops the slow learning rates at their
first evaluation, a trial whose model_init raises is recorded as an error, and the best trial is
in the learning-rate region the grid in test_search.py shows is best.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.search import BestRun
from tests.helpers import RegressionModel
from tests.search.test_search import EVAL_STEPS, MAX_STEPS, make_trainer

ray = pytest.importorskip("ray")
tune = pytest.importorskip("ray.tune")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    # Workers start from Ray's own processes: they find `tests` and `ember` through PYTHONPATH.
    root = str(Path(__file__).resolve().parents[2])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, old) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def last_step(run_dir: Path) -> int:
    lines = (run_dir / "logs.jsonl").read_text().splitlines()
    return int(json.loads(lines[-1])["step"])


def test_ray_search_stops_bad_trials_and_finds_the_good_region(ray_cluster: None, tmp_path: Path) -> None:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    def model_init(config: Any) -> torch.nn.Module:
        if config is not None and config["learning_rate"] < 2e-5:
            raise RuntimeError("simulated failure")
        return RegressionModel()

    trainer = make_trainer(tmp_path / "out", model_init=model_init)
    best = trainer.hyperparameter_search(
        backend="ray",
        hp_space=lambda _: {"learning_rate": tune.loguniform(1e-5, 3e-1)},
        n_trials=4,
        scheduler=ASHAScheduler(metric="objective", mode="min", grace_period=1, reduction_factor=2, max_t=4),
        # One trial at a time, in the sampled order: ASHA's decision at a rung depends on the trials
        # that reached it before, so the order of arrival must not depend on how fast workers start
        # (two at once, the slow rate reached the first rung first on a loaded machine and was kept).
        # random_state=2613 samples 0.03, 1.4e-4, 0.11, 1.3e-5: ASHA records 0.03 at the first
        # evaluation and stops 1.4e-4 there, 0.11 is best, and 1.3e-5 fails in model_init.
        search_alg=BasicVariantGenerator(random_state=2613, max_concurrent=1),
        reuse_actors=True,  # a new worker process per trial costs seconds on a small machine
        storage_path=str(tmp_path / "ray_results"),
        verbose=0,
    )
    assert isinstance(best, BestRun) and best.run_summary is not None
    assert best.hyperparameters["learning_rate"] > 1e-2 and best.objective < 1.0
    trials = {t.trial_id: t for t in best.run_summary.trials}
    assert best.run_id in trials and len(trials) == 4

    failed = [t for t in trials.values() if t.config["learning_rate"] < 2e-5]
    assert failed and all(t.status == "ERROR" for t in failed)
    stopped = []
    for trial_id, trial in trials.items():
        if trial in failed:
            continue
        steps = last_step(tmp_path / "out" / f"run-{trial_id}")
        assert steps == trial.last_result["step"]
        if steps < MAX_STEPS:
            stopped.append(trial)
            assert steps == EVAL_STEPS  # stopped at the first evaluation, not later
            assert trial.last_result["objective"] > 10 * best.objective
    slow = [t for t in trials.values() if 2e-5 <= t.config["learning_rate"] < 1e-3]
    assert slow and stopped == slow, "ASHA must stop exactly the slow learning rates"
    assert trainer.args.output_dir == str(tmp_path / "out") and trainer.model is not None  # restored


def test_ray_checks_the_space_and_direction_before_starting(tmp_path: Path) -> None:
    from ember.search import SearchSpaceError

    trainer = make_trainer(tmp_path)
    with pytest.raises(SearchSpaceError, match=r"`learning_rat`.*Did you mean 'learning_rate'"):
        trainer.hyperparameter_search(backend="ray", hp_space=lambda _: {"learning_rat": tune.uniform(0, 1)})
    with pytest.raises(ValueError, match="one objective.*optuna"):
        trainer.hyperparameter_search(backend="ray", direction=["minimize", "maximize"])
    from ray.tune.search.basic_variant import BasicVariantGenerator

    with pytest.raises(
        ValueError, match=r"max_concurrent_trials is ignored.*BasicVariantGenerator\(max_concurrent=N\)"
    ):
        trainer.hyperparameter_search(
            backend="ray", search_alg=BasicVariantGenerator(), max_concurrent_trials=1
        )
    assert not list(tmp_path.glob("run-*"))  # no trial started
