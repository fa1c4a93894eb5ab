"""Run progress as a stateful part, and the run-length plan."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from ember import TrainingArguments
from ember.engine.run_position import LossTracker, RunProgress, plan_steps


def _progress() -> RunProgress:
    return RunProgress(LossTracker(torch.device("cpu"), filter_nan_inf=False))


def test_progress_round_trips_through_json_with_the_checkpoint_keys():
    progress = _progress()
    progress.start_epoch(2)
    for value in (1.0, 3.0, 5.0):
        progress.advance()
        progress.loss.add(torch.tensor(value))
    assert progress.loss.pop_mean(lambda t: t) == 3.0
    progress.last_logged_step = 7
    progress.loss.add(torch.tensor(0.5))  # logged later: this rank's own share
    shared = json.loads(json.dumps(progress.state_dict()))
    local = json.loads(json.dumps(progress.local_state_dict()))
    # Checkpoints written before RunProgress existed hold exactly these keys; they still load.
    assert set(shared) == {"position", "loss", "last_logged_step"}
    assert shared["position"] == {"epoch": 2, "step_in_epoch": 3}
    again = _progress()
    again.load_state_dict(shared)
    again.load_local_state_dict(local)
    assert (again.epoch, again.step_in_epoch, again.last_logged_step) == (2, 3, 7)
    assert again.loss.mean() == 3.0 and [float(x) for x in again.loss.pending] == [0.5]


def test_epoch_moves_reset_the_step_and_ignore_data_skip_keeps_the_epoch():
    progress = _progress()
    progress.advance()
    progress.start_epoch(0)  # the same epoch (a resumed one): the position stays
    assert progress.step_in_epoch == 1
    progress.end_epoch()
    assert (progress.epoch, progress.step_in_epoch) == (1, 0)
    progress.advance()
    progress.restart_epoch_data()
    assert (progress.epoch, progress.step_in_epoch) == (1, 0)


def test_nan_filter_follows_transformers():
    tracker = LossTracker(torch.device("cpu"), filter_nan_inf=True)
    for value in (2.0, math.nan, 4.0):
        tracker.add(torch.tensor(value))
    # The nan step adds the window's mean so far (2 / 2 = 1): (2 + 1 + 4) / 3.
    assert tracker.pop_mean(lambda t: t) == pytest.approx(7 / 3)


def test_plan_counts_the_global_batch_over_data_parallel_ranks(tmp_path):
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=3, num_train_epochs=2
    )
    plan = plan_steps(args, range(10), world_size=2)  # 10 micro-batches: ceil(10 / 3) steps an epoch
    assert (plan.max_steps, plan.num_epochs, plan.steps_per_epoch) == (8, 2, 4)
    assert plan.num_samples_seen(5) == 5 * 4 * 3 * 2
    with pytest.raises(ValueError, match="max_steps must be set"):
        plan_steps(args, None, world_size=1)
    streaming = TrainingArguments(str(tmp_path), max_steps=5)
    assert plan_steps(streaming, None, world_size=1).num_epochs == sys.maxsize
