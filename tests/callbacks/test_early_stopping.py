from __future__ import annotations

import logging

import pytest

from ember.callbacks.early_stopping import EarlyStoppingCallback
from ember.callbacks.state import (
    TrainerControl,
    TrainerState,
    export_callback_states,
    restore_callback_states,
)
from tests.helpers import args_with


def _args(**overrides):
    base = dict(
        metric_for_best_model="loss",
        greater_is_better=False,
        load_best_model_at_end=True,
        eval_strategy="steps",
    )
    base.update(overrides)
    # The callback checks its own needs, also on arguments that skipped validation.
    return args_with(**base)


def _run(callback, args, values, best_tracking=True):
    """Feed eval values; the trainer's best-metric update is simulated after each on_evaluate."""
    state, control, counters = TrainerState(), TrainerControl(), []
    for value in values:
        callback.on_evaluate(args, state, control, metrics={"eval_loss": value, "eval_acc": value})
        counters.append(callback.early_stopping_patience_counter)
        if best_tracking and (
            state.best_metric is None or (value > state.best_metric) == bool(args.greater_is_better)
        ):
            state.best_metric = value
    return counters, control.should_training_stop


def test_stops_after_patience_evaluations_without_improvement():
    counters, stop = _run(EarlyStoppingCallback(early_stopping_patience=2), _args(), [1.0, 0.8, 0.9, 0.85])
    assert counters == [0, 0, 1, 2] and stop


def test_improvement_resets_the_counter():
    counters, stop = _run(EarlyStoppingCallback(early_stopping_patience=2), _args(), [1.0, 1.1, 0.5, 0.6])
    assert counters == [0, 1, 0, 1] and not stop


def test_threshold_and_greater_is_better():
    args = _args(metric_for_best_model="eval_acc", greater_is_better=True)
    counters, stop = _run(
        EarlyStoppingCallback(3, early_stopping_threshold=0.05), args, [0.5, 0.52, 0.6, 0.4]
    )
    assert counters == [0, 1, 0, 1] and not stop


def test_same_counters_as_transformers():
    hf = pytest.importorskip("transformers.trainer_callback")
    values = [1.0, 0.99, 0.95, 0.96, 0.5, 0.5, 0.7]
    for greater in (False, True):
        for threshold in (0.0, 0.02, None):
            args = _args(greater_is_better=greater)
            ours = _run(EarlyStoppingCallback(3, threshold), args, values)
            theirs = _run(
                hf.EarlyStoppingCallback(3, threshold if threshold is not None else 0.0), args, values
            )
            assert ours == theirs


def test_missing_metric_warns_and_skips(caplog):
    cb = EarlyStoppingCallback()
    control = TrainerControl()
    with caplog.at_level(logging.WARNING, logger="ember.callbacks.early_stopping"):
        cb.on_evaluate(_args(metric_for_best_model="f1"), TrainerState(), control, metrics={"eval_loss": 1.0})
    assert "eval_f1" in caplog.text and cb.early_stopping_patience_counter == 0


def test_train_begin_checks_args(caplog):
    cb = EarlyStoppingCallback()
    with pytest.raises(ValueError, match="metric_for_best_model"):
        cb.on_train_begin(_args(metric_for_best_model=None), TrainerState(), TrainerControl())
    with pytest.raises(ValueError, match="eval_strategy"):
        cb.on_train_begin(_args(eval_strategy="no"), TrainerState(), TrainerControl())
    with caplog.at_level(logging.WARNING, logger="ember.callbacks.early_stopping"):
        cb.on_train_begin(_args(load_best_model_at_end=False), TrainerState(), TrainerControl())
    assert "load_best_model_at_end" in caplog.text


def test_patience_counter_survives_export_and_restore():
    cb = EarlyStoppingCallback(early_stopping_patience=4, early_stopping_threshold=0.1)
    _run(cb, _args(), [1.0, 1.5, 1.2])
    assert cb.early_stopping_patience_counter == 2
    saved = export_callback_states([cb])
    fresh = EarlyStoppingCallback()
    restore_callback_states([fresh], saved)
    assert fresh.state() == cb.state()
    state, control = TrainerState(best_metric=1.0), TrainerControl()
    fresh.on_evaluate(_args(), state, control, metrics={"eval_loss": 1.3})
    fresh.on_evaluate(_args(), state, control, metrics={"eval_loss": 1.3})
    assert fresh.early_stopping_patience_counter == 4 and control.should_training_stop
