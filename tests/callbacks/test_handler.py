from __future__ import annotations

import inspect
import logging

import pytest

from ember.args import TrainingArguments
from ember.callbacks import (
    EVENTS,
    CallbackHandler,
    DefaultFlowCallback,
    EarlyStoppingCallback,
    EventRecorder,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    build_callbacks,
    check_events,
    normalize_report_to,
)
from ember.callbacks.events import TimelineError, matches_timeline, timeline_grammar
from ember.callbacks.state import TrainerControl, TrainerState
from ember.integrations import available_trackers
from ember.integrations.jsonl import JsonlLoggerCallback


def _args(**overrides):
    base = dict(
        logging_strategy="steps",
        logging_steps=2,
        logging_first_step=False,
        eval_strategy="no",
        eval_steps=None,
        eval_delay=0,
        eval_on_start=False,
        save_strategy="no",
        save_steps=500,
        output_dir="unused",
        disable_tqdm=True,
        report_to=[],
        metric_for_best_model=None,
        greater_is_better=None,
        load_best_model_at_end=False,
    )
    base.update(overrides)
    return TrainingArguments(**base)


class Tagger(TrainerCallback):
    def __init__(self, tag, calls):
        self.tag, self.calls = tag, calls

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.calls.append((self.tag, dict(logs), sorted(kwargs)))


def test_events_are_the_trainer_callback_methods_and_match_transformers():
    methods = {
        name for name, _ in inspect.getmembers(TrainerCallback, inspect.isfunction) if name.startswith("on_")
    }
    assert methods == set(EVENTS)
    hf = pytest.importorskip("transformers.trainer_callback")
    hf_methods = {
        n for n, _ in inspect.getmembers(hf.TrainerCallback, inspect.isfunction) if n.startswith("on_")
    }
    assert hf_methods == set(EVENTS)


def test_events_fire_in_list_order_with_hf_kwargs():
    calls: list = []
    handler = CallbackHandler(
        [DefaultFlowCallback(), Tagger("a", calls), Tagger("b", calls)], "model", "tok", "opt", "sch"
    )
    handler.train_dataloader = "train_dl"
    control = TrainerControl(should_log=True)
    out = handler.on_log(_args(), TrainerState(), control, {"loss": 1.0})
    assert out is control and not control.should_log
    assert [c[0] for c in calls] == ["a", "b"]
    expected = [
        "eval_dataloader",
        "lr_scheduler",
        "model",
        "optimizer",
        "processing_class",
        "train_dataloader",
    ]
    assert calls[0][1:] == ({"loss": 1.0}, expected)


def test_returned_control_replaces_and_none_keeps():
    replacement = TrainerControl()

    class Replacer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            return replacement

    seen = []

    class Watcher(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(control)

    handler = CallbackHandler([DefaultFlowCallback(), Replacer(), Watcher()])
    out = handler.on_step_end(_args(), TrainerState(max_steps=10, global_step=1), TrainerControl())
    assert out is replacement and seen == [replacement]


def test_only_overriding_callbacks_are_dispatched():
    flow, printer = DefaultFlowCallback(), PrinterCallback()
    handler = CallbackHandler([flow, printer, TrainerCallback()])
    assert handler.overriding("on_step_end") == (flow,)
    assert handler.overriding("on_log") == (printer,)
    assert handler.overriding("on_substep_end") == ()
    assert handler.overriding("on_optimizer_step") == ()


def test_transformers_callbacks_run_unchanged():
    hf = pytest.importorskip("transformers.trainer_callback")
    seen = []

    class HFStyle(hf.TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            seen.append((metrics, model))
            control.should_training_stop = True

    cb = HFStyle()
    handler = CallbackHandler([DefaultFlowCallback(), cb], model="m")
    # transformers' no-op defaults are skipped like ours.
    assert handler.overriding("on_step_begin") == () and handler.overriding("on_evaluate") == (cb,)
    control = handler.on_evaluate(
        _args(), TrainerState(), TrainerControl(should_evaluate=True), {"eval_loss": 1}
    )
    assert seen == [({"eval_loss": 1}, "m")] and control.should_training_stop and not control.should_evaluate

    es = hf.EarlyStoppingCallback(early_stopping_patience=1)
    handler.add_callback(es)
    args = _args(metric_for_best_model="loss", greater_is_better=False)
    control = handler.on_evaluate(args, TrainerState(best_metric=0.5), TrainerControl(), {"eval_loss": 0.7})
    assert es.early_stopping_patience_counter == 1 and control.should_training_stop


def test_add_class_instantiates_duplicate_warns_and_pop_remove(caplog):
    handler = CallbackHandler([DefaultFlowCallback])
    assert isinstance(handler.callbacks[0], DefaultFlowCallback)
    with caplog.at_level(logging.WARNING, logger="ember.callbacks.handler"):
        handler.add_callback(DefaultFlowCallback())
    assert "second DefaultFlowCallback" in caplog.text

    printer = PrinterCallback()
    handler.add_callback(printer)
    assert handler.pop_callback(PrinterCallback) is printer
    assert handler.overriding("on_log") == ()
    handler.add_callback(printer)
    handler.remove_callback(printer)
    assert handler.callback_list == "DefaultFlowCallback\nDefaultFlowCallback"
    assert handler.pop_callback(printer) is None
    handler.remove_callback(DefaultFlowCallback)
    assert len(handler.callbacks) == 1


def test_missing_default_flow_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ember.callbacks.handler"):
        CallbackHandler([PrinterCallback()])
    assert "DefaultFlowCallback" in caplog.text


def test_direct_list_edits_update_dispatch():
    handler = CallbackHandler([DefaultFlowCallback()])
    recorder = EventRecorder()
    handler.callbacks.append(recorder)
    handler.on_substep_end(_args(), TrainerState(), TrainerControl())
    assert recorder.events == ["on_substep_end"]
    del handler.callbacks[-1]
    assert handler.overriding("on_substep_end") == ()
    handler.callbacks = [recorder]
    assert handler.overriding("on_substep_end") == (recorder,)


def test_handler_resets_flags_like_transformers():
    handler = CallbackHandler([DefaultFlowCallback()])
    args, state = _args(), TrainerState(max_steps=100)
    control = TrainerControl(True, True, True, True, True)
    handler.on_step_begin(args, state, control)
    assert (control.should_log, control.should_evaluate, control.should_save) == (False, False, False)
    handler.on_epoch_begin(args, state, control)
    assert not control.should_epoch_stop and control.should_training_stop
    handler.on_train_begin(args, state, control)
    assert not control.should_training_stop
    control.should_save = True
    handler.on_save(args, state, control)
    assert not control.should_save


# --- timeline -------------------------------------------------------------------------------


def _evaluate(handler, args, state, control, batches=2):
    for _ in range(batches):
        control = handler.on_prediction_step(args, state, control)
    control = handler.on_log(args, state, control, {"eval_loss": 1.0})
    return handler.on_evaluate(args, state, control, {"eval_loss": 1.0})


def _log_evaluate_save(handler, args, state, control):
    if control.should_log:
        control = handler.on_log(args, state, control, {"loss": 1.0})
    if control.should_evaluate:
        control = _evaluate(handler, args, state, control)
    if control.should_save:
        control = handler.on_save(args, state, control)
    return control


def _fake_train(args, epochs, steps_per_epoch, grad_accum):
    """A loop that follows the pseudocode in ember.callbacks.events, steered by DefaultFlowCallback."""
    recorder = EventRecorder()
    handler = CallbackHandler([DefaultFlowCallback(), recorder])
    state, control = TrainerState(max_steps=epochs * steps_per_epoch), TrainerControl()
    state.compute_steps(args, state.max_steps)
    control = handler.on_init_end(args, state, control)
    control = handler.on_train_begin(args, state, control)
    if args.eval_on_start:
        control = _evaluate(handler, args, state, control)
    for epoch in range(epochs):
        control = handler.on_epoch_begin(args, state, control)
        for step in range(steps_per_epoch):
            control = handler.on_step_begin(args, state, control)
            for _ in range(grad_accum - 1):
                control = handler.on_substep_end(args, state, control)
            control = handler.on_pre_optimizer_step(args, state, control)
            control = handler.on_optimizer_step(args, state, control)
            state.global_step += 1
            state.epoch = epoch + (step + 1) / steps_per_epoch
            control = handler.on_step_end(args, state, control)
            control = _log_evaluate_save(handler, args, state, control)
            if control.should_epoch_stop or control.should_training_stop:
                break
        control = handler.on_epoch_end(args, state, control)
        control = _log_evaluate_save(handler, args, state, control)
        if control.should_training_stop:
            break
    control = handler.on_log(args, state, control, {"train_loss": 1.0})
    handler.on_train_end(args, state, control)
    return recorder.events


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_strategy": "steps",
            "save_steps": 2,
            "eval_on_start": True,
        },
        {"logging_strategy": "epoch", "eval_strategy": "epoch", "save_strategy": "epoch"},
    ],
)
def test_loop_following_the_pseudocode_matches_the_grammar(overrides):
    events = _fake_train(_args(**overrides), epochs=2, steps_per_epoch=3, grad_accum=3)
    check_events(events)
    assert events.count("on_substep_end") == 2 * 6 and events.count("on_step_end") == 6
    check_events(events[1:], rule="train")


def test_grammar_rejects_wrong_orders_with_a_useful_message():
    good = _fake_train(_args(save_strategy="steps", save_steps=2), epochs=1, steps_per_epoch=2, grad_accum=2)
    assert matches_timeline(good)
    swapped = list(good)
    i = swapped.index("on_pre_optimizer_step")
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    with pytest.raises(
        TimelineError, match=r"Event #\d+ 'on_optimizer_step'.*expected one of \['on_pre_optimizer_step'"
    ):
        check_events(swapped)
    with pytest.raises(TimelineError, match="end too early"):
        check_events(good[:-1])
    save_first = [*good[: good.index("on_log")], "on_save", "on_log", *good[good.index("on_log") + 1 :]]
    assert not matches_timeline(save_first)
    predict = ["on_init_end", "on_prediction_step", "on_prediction_step", "on_predict"]
    assert matches_timeline(predict) and not matches_timeline([*predict[:1], "on_predict", "on_log"])


def test_grammar_only_names_known_events():
    rules = timeline_grammar()
    assert {"session", "train", "evaluate", "predict"} <= set(rules)
    words = {w for rhs in rules.values() for w in rhs.replace("(", " ").replace(")", " ").split()}
    names = {w.rstrip("?*+") for w in words} - {"|", ""}
    assert names <= set(EVENTS) | set(rules)
    with pytest.raises(ValueError, match="Unknown timeline rule"):
        check_events([], rule="nope")


# --- build_callbacks ------------------------------------------------------------------------


def test_build_callbacks_defaults_then_user():
    user = EarlyStoppingCallback()
    cbs = build_callbacks(_args(disable_tqdm=False, report_to="none"), [user])
    # As transformers: report_to="none" means flow + progress and nothing else.
    assert [type(cb) for cb in cbs] == [DefaultFlowCallback, ProgressCallback, EarlyStoppingCallback]
    assert cbs[2] is user
    for report_to in ("jsonl", ["jsonl"]):
        cbs = build_callbacks(_args(disable_tqdm=True, report_to=report_to), [])
        assert [type(cb) for cb in cbs] == [DefaultFlowCallback, PrinterCallback, JsonlLoggerCallback]
    # "all": jsonl first, then every installed tracker (the registry's order).
    cbs = build_callbacks(_args(disable_tqdm=True, report_to="all"), [])
    assert [type(cb) for cb in cbs[:3]] == [DefaultFlowCallback, PrinterCallback, JsonlLoggerCallback]


def test_build_callbacks_printer_and_no_duplicate_jsonl():
    own = JsonlLoggerCallback(filename="mine.jsonl")
    cbs = build_callbacks(_args(disable_tqdm=True, report_to=["jsonl"]), [own, EventRecorder])
    assert [type(cb).__name__ for cb in cbs] == [
        "DefaultFlowCallback",
        "PrinterCallback",
        "JsonlLoggerCallback",
        "EventRecorder",
    ]
    assert cbs[2] is own


def test_report_to_normalisation_and_errors():
    assert normalize_report_to(None) == [] and normalize_report_to("none") == []
    assert normalize_report_to("all") == available_trackers()
    assert normalize_report_to(["jsonl", "jsonl"]) == ["jsonl"]
    with pytest.raises(ValueError, match=r"report_to=.*comet_ml"):
        build_callbacks(_args(report_to=["comet_ml"]), [])


def test_deepcopy_and_pickle_give_an_independent_working_handler():
    import copy
    import pickle

    handler = CallbackHandler([DefaultFlowCallback(), EventRecorder()])
    for clone in (copy.deepcopy(handler), pickle.loads(pickle.dumps(handler))):
        clone.callbacks.append(PrinterCallback())
        assert [type(cb) for cb in clone.overriding("on_log")] == [EventRecorder, PrinterCallback]
        clone.on_substep_end(_args(), TrainerState(), TrainerControl())
        assert clone.callbacks[1].events == ["on_substep_end"]
    assert len(handler.overriding("on_log")) == 1 and handler.callbacks[1].events == []
