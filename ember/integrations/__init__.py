"""Trackers and other integrations. Each heavy one imports its library only when used."""

from __future__ import annotations

from ember.integrations.jsonl import JsonlLoggerCallback

__all__ = ["JsonlLoggerCallback"]
