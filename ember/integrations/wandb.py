"""`WandbCallback` (``report_to="wandb"``): logs to Weights & Biases, online or offline.

Environment (the names transformers honours): ``WANDB_PROJECT`` (default ``huggingface``),
``WANDB_DIR`` (default: the output folder, so run files land in ``output_dir/wandb/``),
``WANDB_MODE=offline`` to write only local files (``wandb sync`` uploads them later),
``WANDB_WATCH`` (``gradients``, ``parameters`` or ``all``: ``wandb.watch`` the model). Every other
``WANDB_*`` variable is read by wandb itself.
"""

from __future__ import annotations

import os
from typing import Any

from ember.integrations import SUMMARY_KEYS, rewrite_logs, run_config
from ember.integrations.tracker import RunTracker

__all__ = ["WandbCallback"]


class WandbCallback(RunTracker):
    """Starts a run when training begins (or at the first log), records the arguments and model config
    as the run config, logs each log dict against ``train/global_step``, and finishes the run when
    training ends. An `evaluate()` after training resumes that run (same id) rather than starting a
    new one. A run the user started before training is used and left open. Only the world process
    zero talks to wandb."""

    def __init__(self) -> None:
        import wandb

        self._wandb = wandb
        self.run: Any = None
        self._owns_run = False
        self._finished_id: str | None = None  # our last run, resumed by logs after train() ended

    def setup(self, args: Any, state: Any, model: Any = None) -> None:
        """Start (or adopt) the run and record the config; called once per training run."""
        wandb = self._wandb
        if wandb.run is not None:
            self.run, self._owns_run = wandb.run, False
        else:
            kwargs = self._init_kwargs(args, state)
            if self._finished_id is not None:
                kwargs.update(id=self._finished_id, resume="allow")
            self.run, self._owns_run = wandb.init(**kwargs), True
        self.run.config.update(run_config(args, model, with_num_parameters=True), allow_val_change=True)
        # Charts use the optimizer step as x axis, so train and eval curves line up.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        watch = os.environ.get("WANDB_WATCH", "false")
        if model is not None and watch in ("gradients", "parameters", "all"):
            self.run.watch(model, log=watch, log_freq=max(100, int(state.logging_steps)))

    def _init_kwargs(self, args: Any, state: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT", "huggingface")}
        # Passed explicitly: wandb reads its environment once per process, so a later change (the
        # next run of a script, a test) would otherwise be ignored.
        kwargs["dir"] = os.environ.get("WANDB_DIR") or args.output_dir
        os.makedirs(kwargs["dir"], exist_ok=True)
        if os.environ.get("WANDB_MODE"):
            kwargs["mode"] = os.environ["WANDB_MODE"]
        if getattr(state, "trial_name", None):
            # Search trials: one run each, grouped under the study's name.
            kwargs["name"], kwargs["group"] = state.trial_name, args.run_name or args.output_dir
        elif args.run_name:
            kwargs["name"] = args.run_name
        return kwargs

    def has_run(self) -> bool:
        return self.run is not None

    def forget_run(self) -> None:
        self._finished_id = None

    def log_values(self, state: Any, logs: dict[str, Any]) -> None:
        for key in SUMMARY_KEYS.intersection(logs):
            self.run.summary[key] = logs[key]
        history = rewrite_logs({k: v for k, v in logs.items() if k not in SUMMARY_KEYS})
        self.run.log({**history, "train/global_step": state.global_step})

    def on_predict(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not metrics:
            return
        if self.run is None:
            self.setup(args, state, kwargs.get("model"))
        self.run.log(rewrite_logs(metrics))

    def close_run(self) -> None:
        if self.run is not None and self._owns_run:
            self._finished_id = self.run.id
            self.run.finish()
        self.run, self._owns_run = None, False
