"""Preemption: on SIGTERM (or another chosen signal) finish the step, checkpoint, and exit.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some seconds before killing a job.
The handler only sets a flag; the loop checks it after each optimizer step, so the checkpoint is
taken at a step boundary with every part consistent, and all ranks agree on the step.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger("ember")


class TrainingPreempted(SystemExit):
    """Raised by `Trainer.train()` after the preemption checkpoint is written.

    A SystemExit, so an unattended script exits (code 143 = 128 + SIGTERM, which schedulers read as
    "terminated") instead of going on to save a half-trained model as final; catch it to do more.
    """

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(143)
        self.step, self.checkpoint = step, checkpoint


class PreemptionWatcher:
    """Installs handlers for `signals` while training runs; restores the previous ones after."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatcher:
        # Python only lets the main thread install handlers; elsewhere preemption is not watched.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            logger.warning(
                "ember: received %s; finishing the current step, then saving a checkpoint.",
                signal.Signals(signum).name,
            )
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None
