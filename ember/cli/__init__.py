"""The `ember` command (`main.py`): train from a YAML file, report on runs."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
