"""The Trainer (`trainer.py`) and the collaborators it holds: the `Run` one train() call owns
(`run.py`), the `Evaluator` (`evaluation.py`), the `MetricsRecorder` (`logs.py`) and the
`Checkpointer` (`checkpointing.py`)."""

from __future__ import annotations

from .trainer import Trainer

__all__ = ["Trainer"]
