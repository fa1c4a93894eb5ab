"""`TrackioCallback` (``report_to="trackio"``): logs to a local Trackio project (SQLite, offline).

Where: ``$TRACKIO_DIR`` if set, else Trackio's default (``~/.cache/huggingface/trackio``); view with
``trackio show``. The project is ``huggingface`` as in transformers (``args.project`` once ember has
that field). ``TRACKIO_SPACE_ID`` and other ``TRACKIO_*`` variables are read by trackio itself.
"""

from __future__ import annotations

from typing import Any

from ember.integrations import SUMMARY_KEYS, rewrite_logs, run_config
from ember.integrations.tracker import RunTracker

__all__ = ["TrackioCallback"]


class TrackioCallback(RunTracker):
    """Starts (or resumes, by ``run_name``) a run when training begins, records the arguments and
    model config as its config, logs each log dict at ``state.global_step`` under transformers'
    names, and finishes the run when training ends. Only the world process zero talks to trackio."""

    def __init__(self) -> None:
        import trackio

        self._trackio = trackio
        self.run: Any = None
        self._run_name: str | None = None  # resumed by a log after train() ended (evaluate())

    def setup(self, args: Any, state: Any, model: Any = None) -> None:
        # Trackio reserves keys starting with "_" (HF configs have _name_or_path and the like).
        config = {
            k: v
            for k, v in run_config(args, model, with_num_parameters=True).items()
            if not k.startswith("_")
        }
        name = getattr(state, "trial_name", None) or self._run_name or args.run_name
        self.run = self._trackio.init(
            project=getattr(args, "project", None) or "huggingface",
            name=name,
            group=(args.run_name or args.output_dir) if getattr(state, "trial_name", None) else None,
            config=config,
            resume="allow",
            embed=False,
            auto_log_cpu=False,  # system metrics are not the Trainer's to log
            auto_log_gpu=False,
        )
        self._run_name = self.run.name

    def has_run(self) -> bool:
        return self.run is not None

    def forget_run(self) -> None:
        self._run_name = None

    def log_values(self, state: Any, logs: dict[str, Any]) -> None:
        # As transformers does: trackio has no run summary, so one-per-run numbers are not charted.
        history = rewrite_logs({k: v for k, v in logs.items() if k not in SUMMARY_KEYS})
        if history:
            self.run.log({**history, "train/global_step": state.global_step}, step=state.global_step)

    def close_run(self) -> None:
        if self.run is not None:
            self._trackio.finish()  # also clears trackio's current run, which init() set to ours
        self.run = None
