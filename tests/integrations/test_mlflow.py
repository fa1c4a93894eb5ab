"""report_to="mlflow" on a local SQLite tracking store, read back with `mlflow.MlflowClient`."""

from __future__ import annotations

import pytest

from ember import TrainingArguments
from ember.callbacks.state import TrainerControl, TrainerState
from tests.integrations.tracking import logged_values, train_tiny

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite store and experiment; the working directory is tmp_path so nothing lands elsewhere."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN", "MLFLOW_TAGS"):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ember-tests")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)  # the fluent API caches the URI per process
    yield mlflow.MlflowClient(uri)
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _only_run(client):
    experiment = client.get_experiment_by_name("ember-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_params_and_metrics_with_steps_match_the_run(tmp_path, store):
    import ember.integrations.mlflow as ember_mlflow

    trainer = train_tiny(str(tmp_path / "out"), "mlflow")
    run = _only_run(store)
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert mlflow.active_run() is None  # ended the run it started
    params = run.data.params
    assert params["learning_rate"] == "0.001" and params["n_embd"] == "32" and params["max_steps"] == "6"

    expected = logged_values(trainer)
    for key in ("loss", "learning_rate", "grad_norm", "eval_loss", "eval_accuracy", "train_loss"):
        assert _history(store, run.info.run_id, key) == expected[key], key  # doubles, stored exactly
    assert [step for step, _ in _history(store, run.info.run_id, "loss")] == [2, 4, 6]

    # evaluate() after train() logs into the same (finished) run instead of opening another.
    trainer.evaluate()
    assert len(_history(store, run.info.run_id, "eval_loss")) == 3
    assert _only_run(store).info.run_id == run.info.run_id
    assert isinstance(trainer.callback_handler.callbacks[-1], ember_mlflow.MLflowCallback)


def test_nested_params_are_flattened_and_long_values_cut(tmp_path, store):
    from ember.integrations.mlflow import MLflowCallback

    class Model:
        config = {"nested": {"depth": {"x": 1}}, "long": "y" * 10_000}

        def parameters(self):
            return iter(())

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", run_name="direct")
    state, control, cb = TrainerState(), TrainerControl(), MLflowCallback()
    cb.on_train_begin(args, state, control, model=Model())
    state.global_step = 7
    cb.on_log(args, state, control, logs={"loss": 0.5, "eval_f1(macro)": 0.25, "note": "text"})
    cb.on_train_end(args, state, control)

    run = _only_run(store)
    limit = mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
    assert run.data.params["nested.depth.x"] == "1"
    assert len(run.data.params["long"]) == limit and run.data.params["long"].endswith("...")
    # Metric names MLflow rejects are sanitised; strings are not metrics.
    assert run.data.metrics == {"loss": 0.5, "eval_f1_macro_": 0.25}
    assert _history(store, run.info.run_id, "loss") == [(7, 0.5)]


def test_a_run_the_user_started_is_used_and_left_open(tmp_path, store):
    mlflow.set_experiment("ember-tests")
    with mlflow.start_run(run_name="mine") as mine:
        train_tiny(str(tmp_path / "out"), "mlflow", eval_strategy="no")
        assert mlflow.active_run().info.run_id == mine.info.run_id
    run = _only_run(store)
    assert run.info.run_id == mine.info.run_id
    assert [step for step, _ in _history(store, run.info.run_id, "loss")] == [2, 4, 6]


def test_only_world_process_zero_logs(tmp_path, store):
    from ember.integrations.mlflow import MLflowCallback

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    state, control, cb = TrainerState(is_world_process_zero=False), TrainerControl(), MLflowCallback()
    cb.on_train_begin(args, state, control)
    cb.on_log(args, state, control, logs={"loss": 1.0})
    cb.on_train_end(args, state, control)
    assert cb.run_id is None and mlflow.active_run() is None
    assert store.get_experiment_by_name("ember-tests") is None
