from __future__ import annotations

import json
import math

import numpy as np

from ember.args import TrainingArguments
from ember.callbacks.handler import CallbackHandler
from ember.callbacks.state import TrainerControl, TrainerState
from ember.integrations.jsonl import JsonlLoggerCallback, to_json_safe


def test_each_log_is_one_strict_json_line_in_a_created_folder(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "run" / "nested"))
    handler = CallbackHandler([JsonlLoggerCallback()])
    state = TrainerState(global_step=3, epoch=0.5)
    handler.on_log(args, state, TrainerControl(), {"loss": 1.25, "grad_norm": math.nan, "lr": math.inf})
    state.global_step, state.epoch = 6, 1.0
    handler.on_log(args, state, TrainerControl(), {"eval_acc": np.float32(0.5), "epoch": 0.99, "tag": "x"})

    lines = (tmp_path / "run" / "nested" / "logs.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line, parse_constant=lambda c: 1 / 0) for line in lines)
    assert first["step"] == 3 and first["epoch"] == 0.5 and first["loss"] == 1.25
    assert first["grad_norm"] is None and first["lr"] is None and isinstance(first["time"], float)
    # Values from the logs win over the added keys.
    assert second == {"step": 6, "epoch": 0.99, "time": second["time"], "eval_acc": 0.5, "tag": "x"}
    assert second["time"] >= first["time"]


def test_only_world_process_zero_writes_and_resume_appends(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path))
    cb = JsonlLoggerCallback()
    cb.on_log(args, TrainerState(is_world_process_zero=False), TrainerControl(), logs={"loss": 1.0})
    assert not (tmp_path / "logs.jsonl").exists()
    cb.on_log(args, TrainerState(global_step=1), TrainerControl(), logs={"loss": 1.0})
    JsonlLoggerCallback().on_log(args, TrainerState(global_step=2), TrainerControl(), logs={"loss": 0.5})
    steps = [json.loads(line)["step"] for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_to_json_safe_handles_nested_and_scalar_types():
    value = {"a": [1.0, float("-inf"), np.int64(3)], "b": (True, None), 5: np.array(2.5), "c": object}
    out = to_json_safe(value)
    assert out["a"] == [1.0, None, 3] and out["b"] == [True, None] and out["5"] == 2.5
    assert isinstance(out["c"], str)
    json.dumps(out, allow_nan=False)
