"""`RunTracker`: the lifecycle the experiment trackers that keep a run (wandb, MLflow, trackio) share.

Written once here: only the world process zero talks to the tracker; `train()` closes a run an
earlier `train()` left open (a search trial) and starts a new one; a log with no run open (an
`evaluate()` without `train()`, or after it) opens one, resuming the last training run where the
tracker can; the end of training closes the run. A tracker says how to open, log to and close its
run (`setup`, `log_values`, `close_run`, `forget_run`, `has_run`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ember.callbacks.events import TrainerCallback

if TYPE_CHECKING:
    from ember.args.training_args import TrainingArguments
    from ember.callbacks.state import TrainerControl, TrainerState


class RunTracker(TrainerCallback):
    """Base of a tracker callback with one run per `train()`; subclasses fill in the five methods."""

    def has_run(self) -> bool:
        """Whether a run is open (or one is known that a log resumes)."""
        raise NotImplementedError

    def setup(self, args: TrainingArguments, state: TrainerState, model: Any = None) -> None:
        """Start (or adopt) the run and record its config."""
        raise NotImplementedError

    def log_values(self, state: TrainerState, logs: dict[str, Any]) -> None:
        """Send one log dict at `state.global_step`."""
        raise NotImplementedError

    def close_run(self) -> None:
        """Close the run this callback opened, remembering it so a later log resumes it."""
        raise NotImplementedError

    def forget_run(self) -> None:
        """Forget the closed run: the next `train()` starts a new one."""

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        self.close_run()  # a run left open by an earlier train() (a search trial) is closed first
        self.forget_run()  # each train() is a new run
        self.setup(args, state, model)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if not self.has_run():
            self.setup(args, state, model)  # evaluate() without train()
        self.log_values(state, logs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.close_run()
