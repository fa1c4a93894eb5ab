"""Strategies: one object per way of placing the model on devices.

The trainer talks to a strategy only through the methods of `SingleDevice`; a multi-process
strategy overrides them. On one process every collective is the identity, so the loop calls them
unconditionally and pays nothing.
"""

from __future__ import annotations

from typing import Any

from .single import SingleDevice, Strategy

__all__ = ["SingleDevice", "Strategy", "build_strategy"]


def build_strategy(args: Any) -> Strategy:
    """The strategy for this process: one device unless launched as several processes."""
    return SingleDevice.from_args(args)
