"""The Trainer (`trainer.py`) and the members mixed into it: evaluate/predict (`evaluation.py`),
log and FLOPs (`logs.py`), and the small ones scripts and subclasses call (`surface.py`)."""

from __future__ import annotations

from .trainer import Trainer

__all__ = ["Trainer"]
