from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from ember.args import TrainingArguments
from ember.callbacks.early_stopping import EarlyStoppingCallback
from ember.callbacks.flow import DefaultFlowCallback
from ember.callbacks.state import (
    ExportableState,
    TrainerControl,
    TrainerState,
    export_callback_states,
    is_exportable,
    restore_callback_states,
)


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers.trainer_callback")


def _filled_state(cls, **extra):
    return cls(
        epoch=1.5,
        global_step=12,
        max_steps=20,
        logging_steps=2,
        eval_steps=4,
        save_steps=6,
        train_batch_size=8,
        num_train_epochs=2,
        num_input_tokens_seen=1234,
        total_flos=5.5e9,
        log_history=[{"loss": 0.5, "step": 2, "epoch": 0.25}, {"eval_loss": 0.4, "step": 4}],
        best_metric=0.4,
        best_global_step=4,
        best_model_checkpoint="out/checkpoint-4",
        trial_params={"lr": 0.1},
        **extra,
    )


@pytest.mark.surface  # compares with the locked transformers; `make compat` reports drift
def test_fields_and_defaults_match_transformers(hf):
    ours = {f.name: f for f in dataclasses.fields(TrainerState)}
    theirs = {f.name: f for f in dataclasses.fields(hf.TrainerState)}
    assert list(ours) == list(theirs)
    assert json.loads(TrainerState().to_json_string()) == dataclasses.asdict(hf.TrainerState())
    assert dataclasses.asdict(TrainerControl()) == dataclasses.asdict(hf.TrainerControl())


def test_json_text_is_identical_to_transformers(hf, tmp_path):
    ours = _filled_state(
        TrainerState,
        stateful_callbacks=[EarlyStoppingCallback(3, 0.01), EarlyStoppingCallback(), TrainerControl()],
    )
    theirs = _filled_state(
        hf.TrainerState,
        stateful_callbacks=[
            hf.EarlyStoppingCallback(3, 0.01),
            hf.EarlyStoppingCallback(),
            hf.TrainerControl(),
        ],
    )
    hf_path = tmp_path / "hf.json"
    theirs.save_to_json(str(hf_path))
    ours.save_to_json(tmp_path / "ours.json")
    assert (tmp_path / "ours.json").read_text() == hf_path.read_text()
    assert isinstance(ours.stateful_callbacks["EarlyStoppingCallback"], list)


def test_loads_transformers_file_and_transformers_loads_ours(hf, tmp_path):
    es = hf.EarlyStoppingCallback(early_stopping_patience=2)
    es.early_stopping_patience_counter = 1
    theirs = _filled_state(
        hf.TrainerState, stateful_callbacks=[es, hf.TrainerControl(should_training_stop=True)]
    )
    theirs.save_to_json(str(tmp_path / "trainer_state.json"))

    loaded = TrainerState.load_from_json(tmp_path / "trainer_state.json")
    assert dataclasses.asdict(loaded) == dataclasses.asdict(theirs)
    assert loaded.stateful_callbacks["EarlyStoppingCallback"]["attributes"] == {
        "early_stopping_patience_counter": 1
    }

    loaded.save_to_json(tmp_path / "again.json")
    back = hf.TrainerState.load_from_json(str(tmp_path / "again.json"))
    assert dataclasses.asdict(back) == dataclasses.asdict(theirs)


def test_load_ignores_unknown_keys_and_save_leaves_no_temp_file(tmp_path):
    path = tmp_path / "trainer_state.json"
    data = json.loads(_filled_state(TrainerState).to_json_string())
    data["field_from_the_future"] = 1
    path.write_text(json.dumps(data))
    state = TrainerState.load_from_json(path)
    assert state.global_step == 12 and state.log_history[1] == {"eval_loss": 0.4, "step": 4}
    state.save_to_json(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json"]
    assert "field_from_the_future" not in json.loads(path.read_text())


def test_compute_steps_resolves_ratios_and_keeps_none():
    state = TrainerState()
    args = TrainingArguments("unused", logging_steps=0.1, save_steps=7)  # eval_steps None: logging's
    state.compute_steps(args, max_steps=95)
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (10, 500, 7)


def test_control_state_round_trip():
    flags = TrainerControl(should_training_stop=True, should_log=True)
    assert TrainerControl.from_state(flags.state()) == flags


def test_post_init_rejects_non_exportable_callbacks():
    with pytest.raises(TypeError, match="DefaultFlowCallback"):
        TrainerState(stateful_callbacks=[DefaultFlowCallback()])


def test_early_stopping_counter_survives_checkpoint_round_trip(tmp_path):
    es = EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=0.5)
    es.early_stopping_patience_counter = 2
    control = TrainerControl(should_training_stop=True)
    state = TrainerState.from_callbacks([DefaultFlowCallback(), es], control, global_step=9)
    state.save_to_json(tmp_path / "s.json")

    fresh_es, fresh_control = EarlyStoppingCallback(), TrainerControl()
    saved = TrainerState.load_from_json(tmp_path / "s.json").stateful_callbacks
    restored = restore_callback_states([DefaultFlowCallback(), fresh_es], saved, control=fresh_control)
    assert restored == [fresh_es, fresh_control]
    assert fresh_es.early_stopping_patience_counter == 2
    assert fresh_es.early_stopping_patience == 3 and fresh_es.early_stopping_threshold == 0.5
    assert fresh_control.should_training_stop


def test_restore_matches_duplicates_in_order_and_warns(caplog):
    first, second = EarlyStoppingCallback(1), EarlyStoppingCallback(2)
    first.early_stopping_patience_counter, second.early_stopping_patience_counter = 5, 6
    saved = export_callback_states([first, second])
    assert [s["attributes"]["early_stopping_patience_counter"] for s in saved["EarlyStoppingCallback"]] == [
        5,
        6,
    ]
    saved["GoneCallback"] = {"args": {}, "attributes": {}}

    only = EarlyStoppingCallback()
    with caplog.at_level(logging.WARNING, logger="ember.callbacks.state"):
        restore_callback_states([only], saved)
    assert only.early_stopping_patience == 1 and only.early_stopping_patience_counter == 5
    assert "2 state(s) for EarlyStoppingCallback but 1" in caplog.text
    assert "GoneCallback" in caplog.text


def test_transformers_exportable_callback_is_exported(hf):
    es = hf.EarlyStoppingCallback(4)
    assert is_exportable(es) and not is_exportable(DefaultFlowCallback())
    assert export_callback_states([es])["EarlyStoppingCallback"]["args"]["early_stopping_patience"] == 4


def test_exportable_state_requires_state_method():
    class Plain(ExportableState):
        pass

    with pytest.raises(NotImplementedError, match="Plain"):
        Plain().state()
    with pytest.raises(TypeError, match="control"):
        export_callback_states([], control=object())


# `make compat` runs these against the newest transformers, peft, accelerate and datasets.
pytestmark = pytest.mark.dropin
