"""Callbacks: the events the loop fires, the handler that dispatches them, and the defaults.

Event order: see `ember.callbacks.events`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ember.callbacks.early_stopping import EarlyStoppingCallback
from ember.callbacks.events import EVENTS, EventRecorder, TrainerCallback, check_events
from ember.callbacks.flow import DefaultFlowCallback
from ember.callbacks.handler import CallbackHandler
from ember.callbacks.progress import PrinterCallback, ProgressCallback
from ember.integrations import TRACKER_NAMES, TRACKERS, available_trackers
from ember.state import (
    ExportableState,
    TrainerControl,
    TrainerState,
    export_callback_states,
    restore_callback_states,
)

__all__ = [
    "EVENTS",
    "SUPPORTED_REPORT_TO",
    "CallbackHandler",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "EventRecorder",
    "ExportableState",
    "PrinterCallback",
    "ProgressCallback",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "build_callbacks",
    "check_events",
    "export_callback_states",
    "normalize_report_to",
    "restore_callback_states",
]

# The trackers' registry owns the names; "all" means the installed ones, "none" none of them.
SUPPORTED_REPORT_TO = TRACKER_NAMES


def normalize_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """``report_to`` as a list of tracker names: None/"none" -> [], "all" -> every installed one.

    Raises ValueError naming ``report_to`` for a tracker ember does not ship.
    """
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "none" in names:
        return []
    if "all" in names:
        return available_trackers()
    unknown = [name for name in names if name not in SUPPORTED_REPORT_TO]
    if unknown:
        raise ValueError(
            f"report_to={unknown} is not supported by ember yet; use one of "
            f"{['none', 'all', *SUPPORTED_REPORT_TO]} (the JSONL log is always written)."
        )
    return list(dict.fromkeys(names))


def build_callbacks(args: Any, user_callbacks: Iterable[Any] | None = None) -> list[Any]:
    """The callbacks a Trainer starts with: defaults first, then the user's, in their order.

    Defaults: `DefaultFlowCallback`, then `PrinterCallback` if ``args.disable_tqdm`` else
    `ProgressCallback`, then `JsonlLoggerCallback`, then one callback per tracker named in
    ``args.report_to`` (the registry is `ember.integrations.TRACKERS`), skipping any the user passed
    an instance of. The JSONL log is ember's embedded tracker and is always on, even with
    ``report_to="none"`` (it costs one small file append per log), unless the user passes their own
    `JsonlLoggerCallback`. An unknown tracker name (ValueError) or one whose package is missing
    (`TrackerNotInstalledError`) fails here, before training starts. Classes in `user_callbacks`
    are instantiated.
    """
    from ember.integrations.jsonl import JsonlLoggerCallback

    user = [cb() if isinstance(cb, type) else cb for cb in (user_callbacks or ())]
    callbacks: list[Any] = [
        DefaultFlowCallback(),
        PrinterCallback() if getattr(args, "disable_tqdm", False) else ProgressCallback(),
    ]
    if not any(isinstance(cb, JsonlLoggerCallback) for cb in user):
        callbacks.append(JsonlLoggerCallback())
    for name in normalize_report_to(getattr(args, "report_to", None)):
        tracker_cls = TRACKERS[name].load()
        if not any(isinstance(cb, tracker_cls) for cb in callbacks + user):
            callbacks.append(tracker_cls())
    return callbacks + user
