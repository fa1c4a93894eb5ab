"""report_to="trackio": a local (offline) Trackio project, read back with trackio's own SQLiteStorage.

Trackio fixes its folder (``TRACKIO_DIR``) when first imported, so the run and the read-back happen
in a child process with its own TRACKIO_DIR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ember import TrainingArguments
from ember.callbacks.state import TrainerControl, TrainerState

pytest.importorskip("trackio")

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys
import trackio
from trackio.sqlite_storage import SQLiteStorage
from tests.integrations.tracking import train_tiny

trainer = train_tiny(sys.argv[1], "trackio")
history = list(trainer.state.log_history)
after_train = SQLiteStorage.get_logs("huggingface", "tiny-run")
trainer.evaluate()  # resumes the finished run
trackio.finish()
print(json.dumps({
    "history": history,
    "after_train": after_train,
    "logs": SQLiteStorage.get_logs("huggingface", "tiny-run"),
    "runs": SQLiteStorage.get_runs("huggingface"),
    "config": SQLiteStorage.get_run_config("huggingface", "tiny-run"),
    "params": sum(p.numel() for p in trainer.model.parameters()),
}, default=str))
"""


def test_local_project_holds_the_logs_steps_and_config(tmp_path):
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (tmp_path / "trackio" / "huggingface.db").is_file() and result["runs"] == ["tiny-run"]

    history, logs = result["history"], result["after_train"]
    for key, name in (("loss", "train/loss"), ("eval_loss", "eval/loss"), ("eval_accuracy", "eval/accuracy")):
        expected = [(h["step"], h[key]) for h in history if key in h]
        got = [(entry["step"], entry[name]) for entry in logs if name in entry]
        assert got == expected, name
    assert all(entry["step"] == entry["train/global_step"] for entry in logs)
    # One-per-run numbers are not charted, as in transformers.
    assert not any("train/train_runtime" in entry for entry in logs)
    # evaluate() after train() resumed the same run.
    final_eval = [e for e in result["logs"] if "eval/loss" in e][-1]
    assert len(result["logs"]) == len(logs) + 1 and final_eval["step"] == 6
    config = result["config"]
    assert config["learning_rate"] == 1e-3 and config["n_embd"] == 32
    assert config["model/num_parameters"] == result["params"]


def test_only_world_process_zero_starts_a_run(tmp_path, monkeypatch):
    from ember.integrations.trackio import TrackioCallback

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    state, control, cb = TrainerState(is_world_process_zero=False), TrainerControl(), TrackioCallback()
    cb.on_train_begin(args, state, control)
    cb.on_log(args, state, control, logs={"loss": 1.0})
    cb.on_train_end(args, state, control)
    assert cb.run is None and not (tmp_path / "out").exists()
