"""Callback events, and the one place that says in which order the Trainer fires them.

Timeline (pseudocode)::

    Trainer.__init__():
        on_init_end
    Trainer.train():
        on_train_begin
        if args.eval_on_start: evaluate()
        for each remaining epoch:
            on_epoch_begin                     # control.should_epoch_stop = False
            for each optimizer step of the epoch:
                on_step_begin                  # control.should_log/evaluate/save = False
                for each micro-batch but the last: forward, backward, on_substep_end
                last micro-batch: forward, backward, clip gradients
                on_pre_optimizer_step
                optimizer.step()
                on_optimizer_step
                scheduler.step(); zero grads; state.global_step += 1; state.epoch updated
                on_step_end                    # DefaultFlowCallback sets the should_* flags
                log_evaluate_save()
                if control.should_epoch_stop or control.should_training_stop: break
            on_epoch_end
            log_evaluate_save()
            if control.should_training_stop: break
        on_log                                 # the train summary: train_runtime, train_loss, ...
        on_train_end
    log_evaluate_save():
        if control.should_log: on_log          # only if a step ran since the last log
        if control.should_evaluate: evaluate()
        if control.should_save: write checkpoint; on_save
    Trainer.evaluate():
        for each eval batch: on_prediction_step
        on_log                                 # the eval metrics
        on_evaluate
    Trainer.predict():
        for each batch: on_prediction_step
        on_predict

``on_push_begin`` exists for transformers compatibility; ember never pushes, so never fires it.

The same timeline as a grammar over event names, read by `check_events` (so the loop is tested
against this docstring). ``x?`` optional, ``x*`` any number, ``x+`` one or more, ``a | b``
either, parentheses group; other names are rules defined here.

Grammar::

    session  := on_init_end ( train | evaluate | predict )*
    train    := on_train_begin evaluate? epoch* on_log on_train_end
    epoch    := on_epoch_begin step* on_epoch_end after
    step     := on_step_begin on_substep_end* on_pre_optimizer_step on_optimizer_step on_step_end after
    after    := on_log? evaluate? on_save?
    evaluate := on_prediction_step* on_log on_evaluate
    predict  := on_prediction_step* on_predict
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from .state import TrainerControl, TrainerState

__all__ = [
    "EVENTS",
    "EventRecorder",
    "TimelineError",
    "TrainerCallback",
    "check_events",
    "matches_timeline",
    "timeline_grammar",
]

EVENTS: tuple[str, ...] = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
    "on_push_begin",
)


class TrainerCallback:
    """Base class for objects that watch the loop and steer it through `control`.

    Every event receives ``args`` (TrainingArguments), ``state`` (TrainerState) and ``control``
    (TrainerControl) positionally, and as keywords ``model``, ``processing_class``, ``optimizer``,
    ``lr_scheduler``, ``train_dataloader`` and ``eval_dataloader``; ``on_log`` also gets ``logs``,
    ``on_evaluate``/``on_predict`` get ``metrics``. Take the keywords you need and ``**kwargs``.
    Return the (possibly changed) control, or None when it is unchanged. Override only the events
    you use: the handler never calls the no-op defaults. Order: see this module's docstring.
    """

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """At the end of `Trainer.__init__`."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """At the start of `Trainer.train`, after a checkpoint (if any) was loaded."""

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """At the end of `Trainer.train`."""

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """At the start of each epoch."""

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """At the end of each epoch (also an epoch cut short by a stop)."""

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Before the first micro-batch of an optimizer step."""

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After each micro-batch of a step except the last (gradient accumulation)."""

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After gradient clipping, before `optimizer.step()`: gradients are final here."""

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After `optimizer.step()`, before gradients are zeroed."""

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After an optimizer step; ``state.global_step`` already counts it."""

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After an evaluation; ``metrics`` holds its results."""

    def on_predict(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After `Trainer.predict`; ``metrics`` holds its results."""

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After a checkpoint was written."""

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After a log entry was recorded; ``logs`` holds it."""

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """After each batch of evaluation or prediction."""

    def on_push_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Never fired by ember (no hub pushes); kept so transformers callbacks load unchanged."""


class EventRecorder(TrainerCallback):
    """Appends the name of every event it receives to ``self.events`` (for tests and debugging)."""

    def __init__(self) -> None:
        self.events: list[str] = []


def _make_recorder(event: str) -> Any:
    def record(self: EventRecorder, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.events.append(event)

    record.__name__ = record.__qualname__ = event
    return record


for _event in EVENTS:
    setattr(EventRecorder, _event, _make_recorder(_event))


class TimelineError(AssertionError):
    """A recorded event sequence that the timeline grammar does not allow."""


def timeline_grammar() -> dict[str, str]:
    """The grammar rules of this module's docstring, as ``{rule name: right-hand side}``."""
    doc = __doc__
    if not doc:
        raise RuntimeError("ember.callbacks.events needs its docstring; do not run with python -OO.")
    section = doc.split("Grammar::", 1)[1]
    rules = dict(re.findall(r"^\s*(\w+)\s*:=\s*(.+?)\s*$", section, flags=re.MULTILINE))
    if not rules:
        raise RuntimeError("No grammar rules found in the ember.callbacks.events docstring.")
    return rules


# An NFA over event names: transitions[state] = list of (event name or None for epsilon, target).
_Nfa = tuple[list[list[tuple[str | None, int]]], int, int]


@functools.cache
def _compile(rule: str) -> _Nfa:
    rules = timeline_grammar()
    edges: list[list[tuple[str | None, int]]] = []

    def new_state() -> int:
        edges.append([])
        return len(edges) - 1

    def build(tokens: list[str], pos: int, stack: tuple[str, ...]) -> tuple[int, int, int]:
        # Parses an alternation starting at tokens[pos]; returns (start, end, next position).
        start, end = new_state(), new_state()
        while True:
            seq_start = cur = new_state()
            edges[start].append((None, seq_start))
            while pos < len(tokens) and tokens[pos] not in ("|", ")"):
                if tokens[pos] == "(":
                    s, e, pos = build(tokens, pos + 1, stack)
                    pos += 1  # the closing parenthesis
                else:
                    s, e = symbol(tokens[pos], stack)
                    pos += 1
                if pos < len(tokens) and tokens[pos] in "?*+":
                    if tokens[pos] in "?*":
                        edges[s].append((None, e))
                    if tokens[pos] in "*+":
                        edges[e].append((None, s))
                    pos += 1
                edges[cur].append((None, s))
                cur = e
            edges[cur].append((None, end))
            if pos < len(tokens) and tokens[pos] == "|":
                pos += 1
                continue
            return start, end, pos

    def symbol(name: str, stack: tuple[str, ...]) -> tuple[int, int]:
        if name in rules:
            if name in stack:
                raise RuntimeError(f"Timeline grammar rule {name!r} is recursive.")
            s, e, _ = build(re.findall(r"\w+|[()|?*+]", rules[name]), 0, (*stack, name))
            return s, e
        if name not in EVENTS:
            raise RuntimeError(f"Timeline grammar names {name!r}, which is neither a rule nor an event.")
        s, e = new_state(), new_state()
        edges[s].append((name, e))
        return s, e

    if rule not in rules:
        raise ValueError(f"Unknown timeline rule {rule!r}; choose one of {sorted(rules)}.")
    start, accept = symbol(rule, ())
    return edges, start, accept


def _closure(edges: list[list[tuple[str | None, int]]], states: Iterable[int]) -> frozenset[int]:
    seen = set(states)
    todo = list(seen)
    while todo:
        for label, target in edges[todo.pop()]:
            if label is None and target not in seen:
                seen.add(target)
                todo.append(target)
    return frozenset(seen)


def check_events(events: Iterable[str], rule: str = "session") -> None:
    """Raise `TimelineError` unless `events` is a sentence of grammar `rule`.

    The message names the first offending event, its index, the events just before it and the
    events the timeline allows there. Use ``rule="train"`` for the events of one `train()` call.
    """
    edges, start, accept = _compile(rule)
    current = _closure(edges, [start])
    seen: list[str] = []
    for index, event in enumerate(events):
        nxt = [t for s in current for label, t in edges[s] if label == event]
        if not nxt:
            raise TimelineError(
                f"Event #{index} {event!r} is not allowed by the {rule!r} timeline after "
                f"...{seen[-6:]}; expected one of {_expected(edges, current, accept)}."
            )
        current = _closure(edges, nxt)
        seen.append(event)
    if accept not in current:
        raise TimelineError(
            f"The events end too early for the {rule!r} timeline after ...{seen[-6:]}; "
            f"expected one of {_expected(edges, current, accept)}."
        )


def matches_timeline(events: Iterable[str], rule: str = "session") -> bool:
    """Whether `events` follows grammar `rule` (see `check_events` for a reason when it does not)."""
    try:
        check_events(events, rule)
    except TimelineError:
        return False
    return True


def _expected(edges: list[list[tuple[str | None, int]]], states: frozenset[int], accept: int) -> list[str]:
    names = sorted({label for s in states for label, _ in edges[s] if label is not None})
    return [*names, "<end>"] if accept in states else names
