from __future__ import annotations

from ember.args import TrainingArguments
from ember.callbacks.progress import PrinterCallback, ProgressCallback, format_logs
from ember.state import TrainerControl, TrainerState

ARGS = TrainingArguments(output_dir="unused")


def test_format_logs_is_compact_and_does_not_mutate():
    logs = {"loss": 0.123456, "total_flos": 1e18, "step": 3, "note": "x" * 50}
    out = format_logs(logs, max_str_len=10)
    assert out == {"loss": "0.1235", "step": 3, "note": "[string of length 50 > max_str_len=10]"}
    assert "total_flos" in logs


def test_printer_prints_on_world_process_zero_only(capsys):
    PrinterCallback().on_log(
        ARGS, TrainerState(is_world_process_zero=False), TrainerControl(), logs={"loss": 1.0}
    )
    assert capsys.readouterr().out == ""
    PrinterCallback().on_log(ARGS, TrainerState(), TrainerControl(), logs={"loss": 0.25, "total_flos": 5.0})
    assert capsys.readouterr().out == "{'loss': '0.25'}\n"


def test_progress_bar_tracks_steps_and_shows_loss_and_tokens_per_second(capsys):
    cb = ProgressCallback()
    state, control = TrainerState(max_steps=10, global_step=4), TrainerControl()
    cb.on_train_begin(ARGS, state, control)
    assert cb.training_bar.n == 4  # resumed run starts at the checkpoint's step
    state.global_step = 6
    cb.on_step_end(ARGS, state, control)
    assert cb.training_bar.n == 6
    cb.on_log(
        ARGS, state, control, logs={"loss": 0.5, "learning_rate": 1e-3, "train_tokens_per_second": 12345.6}
    )
    assert cb.training_bar.postfix == "loss=0.5, lr=0.001, tok/s=1.235e+04"

    cb.on_prediction_step(ARGS, state, control, eval_dataloader=[0, 1, 2])
    cb.on_prediction_step(ARGS, state, control, eval_dataloader=[0, 1, 2])
    assert (cb.prediction_bar.n, cb.prediction_bar.total) == (2, 3)
    cb.on_evaluate(ARGS, state, control)
    assert cb.prediction_bar is None
    cb.on_train_end(ARGS, state, control)
    assert cb.training_bar is None
    assert "'loss': '0.5'" in capsys.readouterr().out


def test_progress_is_silent_off_process_zero(capsys):
    cb = ProgressCallback()
    state, control = TrainerState(max_steps=3, is_world_process_zero=False), TrainerControl()
    cb.on_train_begin(ARGS, state, control)
    state.global_step = 1
    cb.on_step_end(ARGS, state, control)
    cb.on_prediction_step(ARGS, state, control, eval_dataloader=[0])
    cb.on_log(ARGS, state, control, logs={"loss": 1.0})
    cb.on_train_end(ARGS, state, control)
    captured = capsys.readouterr()
    assert cb.training_bar is None and cb.prediction_bar is None
    assert captured.out == "" and captured.err == ""
