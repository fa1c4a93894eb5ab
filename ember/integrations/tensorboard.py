"""`TensorBoardCallback` (``report_to="tensorboard"``): scalars and text as TensorBoard event files.

Where: ``$TENSORBOARD_LOGGING_DIR`` if set, else ``output_dir/runs/<Mon DD_HH-MM-SS>_<host>`` (the
folder transformers 5 and ``SummaryWriter`` pick). Each hyperparameter-search trial writes into a
subfolder named after the trial.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime
from typing import Any

from ember.callbacks.events import TrainerCallback
from ember.integrations import model_config_dict, rewrite_logs, scalar_value

__all__ = ["TensorBoardCallback", "default_logdir"]

logger = logging.getLogger(__name__)


def default_logdir() -> str:
    """``runs/<Mon DD_HH-MM-SS>_<host>``, relative to the output folder."""
    return os.path.join("runs", datetime.now().strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname())


class TensorBoardCallback(TrainerCallback):
    """Writes each log as ``train/<key>``, ``eval/<key>`` or ``test/<key>`` scalars at
    ``state.global_step`` (strings as text), the arguments as text ``args`` and the model config as
    text ``model_config`` when training begins. Only the world process zero writes.

    `tb_writer` may be a `SummaryWriter` you made; the callback then uses it and does not pick a folder.
    """

    def __init__(self, tb_writer: Any = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer_cls = SummaryWriter
        self.tb_writer = tb_writer
        env_dir = os.environ.get("TENSORBOARD_LOGGING_DIR")
        self.logging_dir: str | None = os.path.expanduser(env_dir) if env_dir else None
        self._run_dir: str | None = None

    def _open(self, args: Any, state: Any) -> None:
        if self.tb_writer is not None:
            return
        if self.logging_dir is None:
            self.logging_dir = os.path.join(args.output_dir, default_logdir())
        trial = getattr(state, "trial_name", None)
        self._run_dir = os.path.join(self.logging_dir, str(trial)) if trial else self.logging_dir
        self.tb_writer = self._writer_cls(log_dir=self._run_dir)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self._open(args, state)
        to_json = getattr(args, "to_json_string", None)
        if callable(to_json):
            self.tb_writer.add_text("args", to_json())
        config = getattr(model, "config", None)
        if config is not None and callable(getattr(config, "to_json_string", None)):
            self.tb_writer.add_text("model_config", config.to_json_string())
        elif model_config_dict(model):
            self.tb_writer.add_text("model_config", str(model_config_dict(model)))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self._open(args, state)  # evaluate() without train() logs too
        for key, value in rewrite_logs(logs).items():
            scalar = scalar_value(value)
            if scalar is not None:
                self.tb_writer.add_scalar(key, scalar, state.global_step)
            elif isinstance(value, str):
                self.tb_writer.add_text(key, value, state.global_step)
            else:
                logger.debug("TensorBoard: %s=%r is neither a number nor a string; not logged", key, value)
        # Flushed per log so a dashboard following the run (or a crash) sees every value.
        self.tb_writer.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
