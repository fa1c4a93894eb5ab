"""`DefaultFlowCallback`: decides when the loop logs, evaluates, saves and stops."""

from __future__ import annotations

from typing import Any

from ember.callbacks.events import TrainerCallback

__all__ = ["DefaultFlowCallback"]


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


class DefaultFlowCallback(TrainerCallback):
    """Sets ``control.should_log/should_evaluate/should_save/should_training_stop`` from the args.

    After each optimizer step: log every ``state.logging_steps`` steps (and at step 1 with
    ``logging_first_step``), evaluate every ``state.eval_steps`` once ``eval_delay`` steps have
    passed, save every ``state.save_steps``, all for the ``"steps"`` strategies. At ``max_steps``
    training stops, with a last evaluation (unless this step already evaluated) and a last save.
    At each epoch end the ``"epoch"`` strategies fire; ``eval_delay`` then counts epochs.
    ``save_strategy="best"`` is decided by the trainer after evaluation, not here.
    """

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        step = state.global_step
        if step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == "steps" and _every(step, state.logging_steps):
            control.should_log = True

        eval_by_steps = args.eval_strategy == "steps" and args.eval_delay <= step
        if eval_by_steps and _every(step, state.eval_steps):
            control.should_evaluate = True
        if args.save_strategy == "steps" and _every(step, state.save_steps):
            control.should_save = True

        if step >= state.max_steps:
            control.should_training_stop = True
            if eval_by_steps and not _every(step, state.eval_steps):
                control.should_evaluate = True
            if args.save_strategy == "steps":
                control.should_save = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if args.logging_strategy == "epoch":
            control.should_log = True
        if args.eval_strategy == "epoch" and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if args.save_strategy == "epoch":
            control.should_save = True
        return control
