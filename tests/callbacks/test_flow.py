from __future__ import annotations

import itertools

import pytest

from ember.callbacks.flow import DefaultFlowCallback
from ember.callbacks.state import TrainerControl, TrainerState
from tests.helpers import args_with


def _args(**overrides):
    base = dict(
        logging_strategy="steps",
        logging_steps=500,
        logging_first_step=False,
        eval_strategy="no",
        eval_steps=None,
        eval_delay=0,
        save_strategy="no",
        save_steps=500,
    )
    base.update(overrides)
    # Combinations validation refuses (eval_strategy='best', ...) are part of the grid transformers runs.
    return args_with(**base)


def _flags(control):
    return (
        control.should_log,
        control.should_evaluate,
        control.should_save,
        control.should_training_stop,
    )


def _steps(flow, args, max_steps):
    """{step: flags} for each optimizer step, with flags cleared per step as the handler does."""
    state = TrainerState(max_steps=max_steps)
    state.compute_steps(args, max_steps)
    out = {}
    for step in range(1, max_steps + 1):
        state.global_step = step
        control = TrainerControl()
        flow.on_step_end(args, state, control)
        out[step] = _flags(control)
    return out


def _steps_where(results, index):
    return [step for step, flags in results.items() if flags[index]]


def test_logging_by_steps_with_first_step():
    results = _steps(DefaultFlowCallback(), _args(logging_steps=3, logging_first_step=True), max_steps=7)
    assert _steps_where(results, 0) == [1, 3, 6]
    assert _steps_where(results, 3) == [7]


def test_eval_by_steps_respects_delay_and_adds_a_final_eval():
    args = _args(eval_strategy="steps", eval_steps=3, eval_delay=4)
    assert _steps_where(_steps(DefaultFlowCallback(), args, max_steps=10), 1) == [6, 9, 10]
    # No duplicate evaluation when the last step is already an eval step.
    assert _steps_where(_steps(DefaultFlowCallback(), args, max_steps=9), 1) == [6, 9]


def test_save_by_steps_saves_at_the_end_and_ratio_steps_resolve():
    results = _steps(DefaultFlowCallback(), _args(save_strategy="steps", save_steps=0.3), max_steps=10)
    assert _steps_where(results, 2) == [3, 6, 9, 10]


@pytest.mark.parametrize("strategy", ["no", "epoch", "best"])
def test_no_step_actions_for_other_strategies(strategy):
    args = _args(logging_strategy=strategy, eval_strategy=strategy, save_strategy=strategy, logging_steps=1)
    results = _steps(DefaultFlowCallback(), args, max_steps=4)
    assert results == {1: (False,) * 4, 2: (False,) * 4, 3: (False,) * 4, 4: (False, False, False, True)}


def test_epoch_strategies_and_epoch_eval_delay():
    flow = DefaultFlowCallback()
    args = _args(logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch", eval_delay=2)
    control = TrainerControl()
    flow.on_epoch_end(args, TrainerState(epoch=1.0), control)
    assert _flags(control) == (True, False, True, False)
    control = TrainerControl()
    flow.on_epoch_end(args, TrainerState(epoch=2.0), control)
    assert _flags(control) == (True, True, True, False)
    control = TrainerControl()
    flow.on_epoch_end(_args(), TrainerState(epoch=1.0), control)
    assert _flags(control) == (False, False, False, False)


def test_same_decisions_as_transformers_on_a_grid():
    hf = pytest.importorskip("transformers.trainer_callback")
    grid = itertools.product(
        ["steps", "epoch", "no"],  # logging_strategy
        [False, True],  # logging_first_step
        ["steps", "epoch", "no"],  # eval_strategy
        [0, 3],  # eval_delay
        ["steps", "epoch", "no", "best"],  # save_strategy
        [2, 0.25],  # steps (absolute / ratio)
    )
    for log_s, first, eval_s, delay, save_s, steps in grid:
        args = _args(
            logging_strategy=log_s,
            logging_steps=steps,
            logging_first_step=first,
            eval_strategy=eval_s,
            eval_steps=steps,
            eval_delay=delay,
            save_strategy=save_s,
            save_steps=steps,
        )
        ours, theirs = _steps(DefaultFlowCallback(), args, 9), _steps(hf.DefaultFlowCallback(), args, 9)
        assert ours == theirs, args
        for epoch in (1.0, 3.0):
            a, b = TrainerControl(), TrainerControl()
            DefaultFlowCallback().on_epoch_end(args, TrainerState(epoch=epoch), a)
            hf.DefaultFlowCallback().on_epoch_end(args, TrainerState(epoch=epoch), b)
            assert _flags(a) == _flags(b), (args, epoch)
