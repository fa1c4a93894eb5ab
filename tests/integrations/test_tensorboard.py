"""report_to="tensorboard": the event files, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember import TrainingArguments
from ember.callbacks.state import TrainerControl, TrainerState
from ember.integrations.tensorboard import TensorBoardCallback
from tests.integrations.tracking import logged_values, train_tiny

pytest.importorskip("tensorboard")


def _read(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {
        tag.removesuffix("/text_summary"): acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        for tag in acc.Tags()["tensors"]
    }
    return scalars, texts


def test_scalars_steps_args_and_model_config_match_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trainer = train_tiny(str(tmp_path), "tensorboard")
    (run_dir,) = (tmp_path / "runs").iterdir()  # output_dir/runs/<Mon DD_HH-MM-SS>_<host>
    assert list(run_dir.glob("events.out.tfevents.*"))
    scalars, texts = _read(run_dir)

    expected = logged_values(trainer)
    names = {"loss": "train/loss", "learning_rate": "train/learning_rate", "eval_loss": "eval/loss"}
    names |= {"eval_accuracy": "eval/accuracy", "train_loss": "train/train_loss", "epoch": "train/epoch"}
    for key, tag in names.items():
        got = scalars[tag]
        assert [step for step, _ in got] == [step for step, _ in expected[key]], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected[key]], rel=1e-6), tag
    assert len(scalars["train/loss"]) == 3 and len(scalars["eval/accuracy"]) == 2
    assert json.loads(texts["args"])["learning_rate"] == 1e-3
    assert json.loads(texts["model_config"])["n_embd"] == 32


def test_tensorboard_logging_dir_env_is_honoured(tmp_path, monkeypatch):
    target = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(target))
    train_tiny(str(tmp_path / "out"), ["tensorboard"], eval_strategy="no")
    assert not (tmp_path / "out" / "runs").exists()
    scalars, _ = _read(target)
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6]


def test_only_world_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control, cb = TrainerState(is_world_process_zero=False), TrainerControl(), TensorBoardCallback()
    cb.on_train_begin(args, state, control)
    cb.on_log(args, state, control, logs={"loss": 1.0})
    cb.on_train_end(args, state, control)
    assert cb.tb_writer is None and list(tmp_path.iterdir()) == []


def test_each_search_trial_writes_its_own_subfolder(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    cb, control = TensorBoardCallback(), TrainerControl()
    for trial, loss in (("trial-0", 1.0), ("trial-1", 2.0)):
        state = TrainerState(global_step=3, is_hyper_param_search=True, trial_name=trial)
        cb.on_train_begin(args, state, control)
        cb.on_log(args, state, control, logs={"loss": loss})
        cb.on_train_end(args, state, control)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["trial-0", "trial-1"]
    assert _read(run_dir / "trial-1")[0]["train/loss"] == [(3, 2.0)]
