"""`CallbackHandler`: fires each event on the attached callbacks, in order.

Dispatch is precomputed: for every event the handler keeps the bound methods of the callbacks
that override it, rebuilt whenever the list changes. An event no callback overrides (most
``on_substep_end`` / ``on_optimizer_step`` calls) costs one empty loop per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ember.callbacks.events import EVENTS, TrainerCallback
from ember.callbacks.state import TrainerControl

logger = logging.getLogger(__name__)

__all__ = ["CallbackHandler"]

_BASE_METHODS = {event: getattr(TrainerCallback, event) for event in EVENTS}


def _overrides(callback: Any, event: str) -> bool:
    """Whether `callback` does something on `event` (a no-op default from a base class does not)."""
    method = getattr(callback, event, None)
    if method is None:
        return False
    func = getattr(method, "__func__", method)
    if func is _BASE_METHODS[event]:
        return False
    # transformers' TrainerCallback defaults are no-ops too; recognised by name so we never import it.
    qualname = getattr(func, "__qualname__", "")
    return not (
        getattr(func, "__module__", "") == "transformers.trainer_callback"
        and qualname.startswith("TrainerCallback.")
    )


class _CallbackList(list):  # type: ignore[type-arg]
    """A list that tells its handler to rebuild the dispatch tables when mutated in place.

    Code written for transformers edits ``handler.callbacks`` directly (append, insert, remove);
    those edits must take effect like `add_callback` does.
    """

    def __init__(self, items: Iterable[Any], on_change: Callable[[], None]) -> None:
        super().__init__(items)
        self._on_change = on_change

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through __init__: the default protocol appends items before restoring _on_change.
        return (type(self), (list(self), self._on_change))


def _notifying(name: str) -> Callable[..., Any]:
    base = getattr(list, name)

    def method(self: _CallbackList, *args: Any, **kwargs: Any) -> Any:
        result = base(self, *args, **kwargs)
        self._on_change()
        return result

    method.__name__ = name
    return method


_MUTATORS = ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse")
for _name in (*_MUTATORS, "__setitem__", "__delitem__", "__iadd__"):
    setattr(_CallbackList, _name, _notifying(_name))


class CallbackHandler(TrainerCallback):
    """Holds the callbacks and calls them for each event, in list order.

    Each event method returns the control to use next: a callback may return a new control or
    None (meaning unchanged). The trainer sets ``model``, ``optimizer``, ``lr_scheduler``,
    ``train_dataloader`` and ``eval_dataloader`` as they are built; every event passes them (and
    ``processing_class``) to the callbacks as keywords.
    """

    def __init__(
        self,
        callbacks: Iterable[Any],
        model: Any = None,
        processing_class: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
    ) -> None:
        self._dispatch: dict[str, tuple[Callable[..., Any], ...]] = {event: () for event in EVENTS}
        self._callbacks = _CallbackList([], self._rebuild)
        for callback in callbacks:
            self.add_callback(callback)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_dataloader: Any = None
        self.eval_dataloader: Any = None
        if not any(type(cb).__name__ == "DefaultFlowCallback" for cb in self._callbacks):
            logger.warning(
                "No DefaultFlowCallback among the callbacks (%s): the trainer will never log, evaluate or "
                "save on its own. Add one with `trainer.add_callback(DefaultFlowCallback)`.",
                self.callback_list or "none",
            )

    @property
    def callbacks(self) -> list[Any]:
        return self._callbacks

    @callbacks.setter
    def callbacks(self, value: Iterable[Any]) -> None:
        self._callbacks = _CallbackList(value, self._rebuild)
        self._rebuild()

    def __getstate__(self) -> dict[str, Any]:
        # Bound methods in the dispatch table would tie a copy to the original's callbacks.
        state = self.__dict__.copy()
        state.pop("_dispatch", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._rebuild()

    def _rebuild(self) -> None:
        if "_callbacks" not in self.__dict__:
            return  # copy/unpickle fills the list before the handler; __setstate__ rebuilds
        self._dispatch = {
            event: tuple(getattr(cb, event) for cb in self._callbacks if _overrides(cb, event))
            for event in EVENTS
        }

    def add_callback(self, callback: Any) -> None:
        """Attach a callback instance, or a callback class (instantiated with no arguments)."""
        instance = callback() if isinstance(callback, type) else callback
        if any(type(cb) is type(instance) for cb in self._callbacks):
            # The names go in the message itself: transformers' tests read the logger call's
            # first argument.
            logger.warning(
                f"Adding a second {type(instance).__name__} to the callbacks; both will run. "
                f"Current callbacks: {self.callback_list}"
            )
        self._callbacks.append(instance)

    def pop_callback(self, callback: Any) -> Any:
        """Detach and return the first callback that is `callback` (instance) or of that class."""
        for cb in self._callbacks:
            if (isinstance(callback, type) and isinstance(cb, callback)) or cb is callback:
                self._callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback: Any) -> None:
        """Detach the first callback that is `callback` (instance) or of that class."""
        self.pop_callback(callback)

    @property
    def callback_list(self) -> str:
        return "\n".join(type(cb).__name__ for cb in self._callbacks)

    def call_event(self, event: str, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        for method in self._dispatch[event]:
            result = method(
                args,
                state,
                control,
                model=self.model,
                processing_class=self.processing_class,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader,
                **kwargs,
            )
            if result is not None:
                control = result
        return control

    def overriding(self, event: str) -> tuple[Any, ...]:
        """The callbacks that act on `event`, in call order."""
        return tuple(getattr(method, "__self__", method) for method in self._dispatch[event])

    # One method per event. The resets mirror transformers: a flag is cleared when the phase it
    # belongs to starts or when its action has run, before callbacks see the event.

    def on_init_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_init_end", args, state, control, **kwargs)

    def on_train_begin(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        control.should_training_stop = False
        return self.call_event("on_train_begin", args, state, control, **kwargs)

    def on_train_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_train_end", args, state, control, **kwargs)

    def on_epoch_begin(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        control.should_epoch_stop = False
        return self.call_event("on_epoch_begin", args, state, control, **kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_epoch_end", args, state, control, **kwargs)

    def on_step_begin(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        control.should_log = control.should_evaluate = control.should_save = False
        return self.call_event("on_step_begin", args, state, control, **kwargs)

    def on_substep_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_substep_end", args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_pre_optimizer_step", args, state, control, **kwargs)

    def on_optimizer_step(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_optimizer_step", args, state, control, **kwargs)

    def on_step_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_step_end", args, state, control, **kwargs)

    def on_evaluate(
        self, args: Any, state: Any, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> Any:
        control.should_evaluate = False
        return self.call_event("on_evaluate", args, state, control, metrics=metrics, **kwargs)

    def on_predict(
        self, args: Any, state: Any, control: TrainerControl, metrics: Any = None, **kwargs: Any
    ) -> Any:
        return self.call_event("on_predict", args, state, control, metrics=metrics, **kwargs)

    def on_save(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        control.should_save = False
        return self.call_event("on_save", args, state, control, **kwargs)

    def on_log(self, args: Any, state: Any, control: TrainerControl, logs: Any = None, **kwargs: Any) -> Any:
        control.should_log = False
        return self.call_event("on_log", args, state, control, logs=logs, **kwargs)

    def on_prediction_step(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_prediction_step", args, state, control, **kwargs)

    def on_push_begin(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        return self.call_event("on_push_begin", args, state, control, **kwargs)
