"""Callbacks: the events the loop fires, the handler that dispatches them, and the defaults.

Event order: see `ember.callbacks.events`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ember.args.training_args import REPORT_TO_BACKENDS as SUPPORTED_REPORT_TO
from ember.args.training_args import TrainingArguments, _normalise_report_to
from ember.callbacks.early_stopping import EarlyStoppingCallback
from ember.callbacks.empty_cache import EmptyCacheCallback
from ember.callbacks.events import EVENTS, EventRecorder, TrainerCallback, check_events
from ember.callbacks.flow import DefaultFlowCallback
from ember.callbacks.handler import CallbackHandler
from ember.callbacks.progress import PrinterCallback, ProgressCallback
from ember.callbacks.state import (
    ExportableState,
    TrainerControl,
    TrainerState,
    export_callback_states,
    restore_callback_states,
)
from ember.integrations import TRACKERS

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


def normalize_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """``report_to`` as a list of tracker names: None/"none" -> [], "all" -> every installed one.

    The rules (and the error naming an unsupported tracker) live with `TrainingArguments`, which
    already normalises ``args.report_to``; this is for code that holds a raw value.
    """
    names = report_to if report_to is None or isinstance(report_to, str) else list(report_to)
    return _normalise_report_to(names)


def build_callbacks(args: TrainingArguments, user_callbacks: Iterable[Any] | None = None) -> list[Any]:
    """The callbacks a Trainer starts with: defaults first, then the user's, in their order.

    Defaults, as transformers: `DefaultFlowCallback`, then `PrinterCallback` if
    ``args.disable_tqdm`` else `ProgressCallback`; then one callback per tracker in
    ``args.report_to`` (``"jsonl"`` adds `JsonlLoggerCallback`, unless the user passes their own).
    ``report_to="none"`` adds nothing and writes no file. Classes in `user_callbacks` are
    instantiated.
    """
    trackers = normalize_report_to(args.report_to)
    user = [cb() if isinstance(cb, type) else cb for cb in (user_callbacks or ())]
    callbacks: list[Any] = [
        DefaultFlowCallback(),
        PrinterCallback() if args.disable_tqdm else ProgressCallback(),
    ]
    if args.torch_empty_cache_steps:
        callbacks.append(EmptyCacheCallback(args.torch_empty_cache_steps))
    for name in trackers:
        tracker_cls = TRACKERS[name].load()
        if not any(isinstance(cb, tracker_cls) for cb in callbacks + user):
            callbacks.append(tracker_cls())
    return callbacks + user
