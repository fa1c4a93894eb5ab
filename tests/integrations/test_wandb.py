"""report_to="wandb" in offline mode: the run's .wandb log, read back with wandb's own reader
(``wandb leet inspect --json``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ember import TrainingArguments
from ember.callbacks.state import TrainerControl, TrainerState
from tests.integrations.tracking import logged_values, train_tiny

pytest.importorskip("wandb")


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb with no network and no writes outside tmp_path."""
    for name in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_NAME", "WANDB_WATCH", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_PROJECT", "ember-tests")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    import wandb

    if wandb.run is not None:  # a failed test must not leak its run into the next one
        wandb.run.finish()


def _records(run_dir: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _offline_run(root: Path) -> Path:
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    return run_dir


def test_offline_run_holds_history_summary_and_config(tmp_path, wandb_offline):
    import wandb

    trainer = train_tiny(str(tmp_path / "out"), "wandb")
    assert wandb.run is None  # finished at train end
    records = _records(_offline_run(tmp_path / "out"))  # no WANDB_DIR: under output_dir/wandb
    by_type: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_type.setdefault(record["type"], []).append(record[record["type"]])

    (run,) = by_type["run"]
    assert (run["project"], run["display_name"]) == ("ember-tests", "tiny-run")
    config = run["config"]["update"] | {
        k: v for c in by_type.get("config", []) for k, v in c.get("update", {}).items()
    }
    assert config["learning_rate"] == 1e-3 and config["n_embd"] == 32
    assert config["model/num_parameters"] == sum(p.numel() for p in trainer.model.parameters())

    history = [h["item"] for h in by_type["history"]]
    expected = logged_values(trainer)
    for key, name in (("loss", "train/loss"), ("eval_loss", "eval/loss"), ("eval_accuracy", "eval/accuracy")):
        got = [(h["train/global_step"], h[name]) for h in history if name in h]
        assert [s for s, _ in got] == [s for s, _ in expected[key]], name
        assert [v for _, v in got] == pytest.approx([v for _, v in expected[key]], rel=1e-6), name
    # One-per-run numbers go to the summary, not the charts.
    assert not any("train/train_runtime" in h or "train_runtime" in h for h in history)
    summary = {k: v for s in by_type["summary"] for k, v in s.get("update", {}).items()}
    assert summary["train_loss"] == pytest.approx(expected["train_loss"][0][1])
    assert by_type["exit"][0].get("exit_code", 0) == 0


def test_wandb_dir_env_is_honoured(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    train_tiny(str(tmp_path / "out"), ["wandb"], eval_strategy="no")
    assert not (tmp_path / "out" / "wandb").exists()
    history = [r["history"]["item"] for r in _records(_offline_run(tmp_path / "elsewhere")) if "history" in r]
    assert [h["train/global_step"] for h in history if "train/loss" in h] == [2, 4, 6]


def test_evaluate_after_train_resumes_the_same_run(tmp_path, wandb_offline):
    import wandb

    trainer = train_tiny(str(tmp_path / "out"), "wandb", eval_strategy="no")
    trainer.evaluate()
    wandb.run.finish()
    # Offline, the resumed run gets a folder of its own (same run id), merged by `wandb sync`.
    records = [r for d in (tmp_path / "out" / "wandb").glob("offline-run-*") for r in _records(d)]
    assert len({r["run"]["run_id"] for r in records if r["type"] == "run"}) == 1
    evals = [
        r["history"]["item"]
        for r in records
        if r["type"] == "history" and "eval/loss" in r["history"]["item"]
    ]
    assert [h["train/global_step"] for h in evals] == [6]


def test_only_world_process_zero_starts_a_run(tmp_path, wandb_offline):
    import wandb

    from ember.integrations.wandb import WandbCallback

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    state, control, cb = TrainerState(is_world_process_zero=False), TrainerControl(), WandbCallback()
    cb.on_train_begin(args, state, control)
    cb.on_log(args, state, control, logs={"loss": 1.0})
    cb.on_train_end(args, state, control)
    assert cb.run is None and wandb.run is None and not (tmp_path / "out").exists()
