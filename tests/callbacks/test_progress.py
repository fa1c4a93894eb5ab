from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ember.args import TrainingArguments
from ember.callbacks.progress import PrinterCallback, ProgressCallback, format_logs
from ember.callbacks.state import TrainerControl, TrainerState

ARGS = TrainingArguments(output_dir="unused")
REPO = Path(__file__).resolve().parents[2]
CURSOR_UP = "\x1b[A"


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


def test_eval_during_training_shows_on_the_training_bar_not_a_second_bar():
    cb = ProgressCallback()
    state, control = TrainerState(max_steps=10, global_step=5), TrainerControl()
    cb.on_train_begin(ARGS, state, control)
    cb.on_prediction_step(ARGS, state, control, eval_dataloader=[0, 1, 2])
    cb.on_prediction_step(ARGS, state, control, eval_dataloader=[0, 1, 2])
    assert cb.prediction_bar is None and cb.training_bar.desc == "eval 2/3"
    # evaluate() logs its metrics before on_evaluate: the label goes as the metrics are written.
    cb.on_log(ARGS, state, control, logs={"eval_loss": 0.5})
    assert cb.training_bar.desc == ""
    cb.on_prediction_step(ARGS, state, control, eval_dataloader=[0, 1])
    cb.on_evaluate(ARGS, state, control)
    assert cb.training_bar.desc == "" and cb.training_bar.n == 5
    cb.on_train_end(ARGS, state, control)


def test_evaluate_outside_training_gets_its_own_bar():
    cb = ProgressCallback()
    state, control = TrainerState(), TrainerControl()
    for _ in range(2):
        cb.on_prediction_step(ARGS, state, control, eval_dataloader=[0, 1, 2])
    assert (cb.prediction_bar.n, cb.prediction_bar.total) == (2, 3)
    cb.on_evaluate(ARGS, state, control)
    assert cb.prediction_bar is None


def _train_with_bars(output_dir: str) -> None:
    from tests.integrations.tracking import train_tiny

    train_tiny(output_dir, "none", disable_tqdm=False, per_device_eval_batch_size=2)


def test_piped_output_has_no_cursor_movement_and_keeps_the_summary(tmp_path, capsys):
    _train_with_bars(str(tmp_path))
    out, err = capsys.readouterr()
    assert CURSOR_UP not in err and CURSOR_UP not in out
    assert "eval 4/4" in err  # eval progress was shown, on the training bar
    assert "6/6" in err and out.rstrip().splitlines()[-1].startswith("{'train_runtime'")


@pytest.mark.skipif(sys.platform != "linux", reason="pty window size set with Linux ioctls")
def test_terminal_output_has_no_cursor_movement(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    code = f"from tests.callbacks.test_progress import _train_with_bars; _train_with_bars({str(tmp_path)!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=child_fd, stderr=child_fd, cwd=REPO, env=env)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO once the child has exited and the pty is drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "| 6/6 [" in text  # the bar was drawn (a terminal, 150 columns)
    assert CURSOR_UP not in text
    assert "eval 4/4" in text
    assert "{'train_runtime'" in text
