"""Trainer state and control objects, with the same fields and JSON format as transformers.

`TrainerState` is what a checkpoint's ``trainer_state.json`` holds; `TrainerControl` holds the
switches callbacks flip to steer the loop. Both keep transformers' field names so existing
callbacks read and write them unchanged, and a ``trainer_state.json`` written by either library
loads in the other.

Callbacks that carry state across a resume (early stopping's patience counter, the control
flags) implement `ExportableState`; `export_callback_states` and `restore_callback_states`
move that state in and out of ``TrainerState.stateful_callbacks``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments

logger = logging.getLogger(__name__)

__all__ = [
    "ExportableState",
    "TrainerControl",
    "TrainerState",
    "export_callback_states",
    "is_exportable",
    "restore_callback_states",
]


class ExportableState:
    """Mixin for objects whose state is saved in checkpoints as plain JSON.

    `state()` returns ``{"args": {...}, "attributes": {...}}``: ``args`` are the constructor
    keyword arguments, ``attributes`` the attributes to set on the new instance afterwards.
    Keep every value JSON-serialisable; checkpoints never pickle.
    """

    def state(self) -> dict[str, Any]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement `state()` to be saved in checkpoints."
        )

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Any:
        """Build an instance from what `state()` returned."""
        instance = cls(**state.get("args", {}))
        for name, value in state.get("attributes", {}).items():
            setattr(instance, name, value)
        return instance


def is_exportable(obj: Any) -> bool:
    """True for ember's `ExportableState` and for transformers' (matched by name, so no import)."""
    if isinstance(obj, ExportableState):
        return True
    return any(klass.__name__ == "ExportableState" for klass in type(obj).__mro__[1:])


@dataclass
class TrainerState:
    """The loop's progress, saved as ``trainer_state.json`` in every checkpoint.

    One step is one optimizer update: with ``gradient_accumulation_steps=n`` a step consumes
    ``n`` micro-batches. ``epoch`` is fractional during training (2.5 = half-way through the
    third epoch). ``logging_steps``/``eval_steps``/``save_steps`` are absolute step counts once
    `compute_steps` has resolved ratios. ``stateful_callbacks`` maps a callback class name to its
    `ExportableState.state()` (a list of states when several instances of the class are attached);
    passing a list of callbacks here exports their states, as transformers does.
    """

    epoch: float = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, str | float | int | bool] | None = None
    stateful_callbacks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.log_history is None:
            self.log_history = []
        value: Any = self.stateful_callbacks
        if value is None:
            self.stateful_callbacks = {}
        elif not isinstance(value, dict):
            # A list of callbacks, as transformers' Trainer passes: export their states now.
            bad = [type(cb).__name__ for cb in value if not is_exportable(cb)]
            if bad:
                raise TypeError(
                    f"stateful_callbacks must all implement ExportableState; got {', '.join(bad)}."
                )
            self.stateful_callbacks = export_callback_states(value)

    @classmethod
    def from_callbacks(
        cls, callbacks: Iterable[Any], control: TrainerControl | None = None, **fields: Any
    ) -> TrainerState:
        """A fresh state whose ``stateful_callbacks`` holds the exportable callbacks' states."""
        return cls(stateful_callbacks=export_callback_states(callbacks, control), **fields)

    def to_json_string(self) -> str:
        # Same text as transformers writes, so files diff cleanly across the two libraries.
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def save_to_json(self, json_path: str | os.PathLike[str]) -> None:
        """Write the state to `json_path`; a crash mid-write leaves any previous file intact."""
        tmp_path = f"{os.fspath(json_path)}.tmp"
        with open(tmp_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        os.replace(tmp_path, json_path)

    @classmethod
    def load_from_json(cls, json_path: str | os.PathLike[str]) -> TrainerState:
        """Read a ``trainer_state.json`` written by ember or transformers.

        Keys this version does not know (written by a newer library) are ignored with a log line,
        so old code can still resume from new checkpoints.
        """
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.info("Ignoring unknown keys in %s: %s", os.fspath(json_path), ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    def compute_steps(self, args: TrainingArguments, max_steps: int) -> None:
        """Resolve ``args.{logging,eval,save}_steps`` into absolute step counts.

        A value below 1 is a fraction of `max_steps`, rounded up; None leaves the default.
        """
        for kind in ("logging", "eval", "save"):
            num_steps = getattr(args, f"{kind}_steps")
            if num_steps is None:
                continue
            if num_steps < 1:
                num_steps = math.ceil(max_steps * num_steps)
            setattr(self, f"{kind}_steps", int(num_steps))


@dataclass
class TrainerControl(ExportableState):
    """Switches callbacks set to steer the loop.

    ``should_training_stop`` stays set until a new `train()`; ``should_epoch_stop`` is cleared at
    each epoch start; ``should_save``/``should_evaluate``/``should_log`` are cleared at each step
    start and once the matching action has run.
    """

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def state(self) -> dict[str, Any]:
        return {"args": dataclasses.asdict(self), "attributes": {}}

    # transformers' reset helpers, which its callbacks and tests call by name.
    def _new_training(self) -> None:
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        self.should_save = self.should_evaluate = self.should_log = False


def export_callback_states(callbacks: Iterable[Any], control: Any = None) -> dict[str, Any]:
    """``{ClassName: state}`` for every exportable object in `callbacks` (then `control`).

    Several instances of one class give a list of states in attachment order, as transformers
    stores them. Objects that are not exportable are skipped; a non-exportable `control` is an
    error because the loop's control flags must survive a resume.
    """
    objects = list(callbacks)
    if control is not None:
        if not is_exportable(control):
            raise TypeError(f"`control` must implement ExportableState, got {type(control).__name__}.")
        objects.append(control)
    states: dict[str, Any] = {}
    for obj in objects:
        if not is_exportable(obj):
            continue
        name = type(obj).__name__
        if name not in states:
            states[name] = obj.state()
        elif isinstance(states[name], list):
            states[name].append(obj.state())
        else:
            states[name] = [states[name], obj.state()]
    return states


def restore_callback_states(
    callbacks: Iterable[Any], saved: dict[str, Any], control: Any = None
) -> list[Any]:
    """Load states from ``TrainerState.stateful_callbacks`` into the attached callbacks, in place.

    Objects are matched by class name, in order when a class is attached several times. Each is
    rebuilt with ``type(obj).from_state(state)`` (or ``type(obj)(**args)`` plus the attributes)
    and the result copied into the existing object, so references held by the user, the handler
    and the trainer stay valid. Pass the trainer's `control` to restore its flags too. Saved
    classes that are not attached, and count mismatches, are logged as warnings. Returns the
    objects that were restored.
    """
    objects = list(callbacks) + ([control] if control is not None else [])
    restored: list[Any] = []
    missing: list[str] = []
    for name, data in saved.items():
        states = data if isinstance(data, list) else [data]
        targets = [obj for obj in objects if type(obj).__name__ == name]
        if not targets:
            missing.append(name)
            continue
        if len(targets) != len(states):
            logger.warning(
                "The checkpoint holds %d state(s) for %s but %d such callback(s) are attached; "
                "restoring the first %d in order.",
                len(states),
                name,
                len(targets),
                min(len(states), len(targets)),
            )
        for obj, state in zip(targets, states):
            _restore_one(obj, state)
            restored.append(obj)
    if missing:
        logger.warning(
            "The checkpoint has state for callbacks that are not attached; ignoring: " + ", ".join(missing)
        )
    return restored


class CallbackStates:
    """The stateful callbacks and the control flags as one part of a checkpoint, stored in
    `TrainerState.stateful_callbacks` as transformers stores them."""

    def __init__(self, callbacks: Callable[[], Iterable[Any]], control: TrainerControl) -> None:
        # A callable: callbacks may be added or removed after this part is made.
        self.callbacks, self.control = callbacks, control

    def state_dict(self) -> dict[str, Any]:
        return export_callback_states(self.callbacks(), self.control)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_callback_states(self.callbacks(), state, self.control)


def _restore_one(obj: Any, state: dict[str, Any]) -> None:
    klass = type(obj)
    if hasattr(klass, "from_state"):
        fresh = klass.from_state(state)
    else:
        fresh = klass(**state.get("args", {}))
        for attr, value in state.get("attributes", {}).items():
            setattr(fresh, attr, value)
    vars(obj).update(vars(fresh))
