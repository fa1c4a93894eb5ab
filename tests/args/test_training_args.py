from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.args import (
    UNSUPPORTED_HF_FIELDS,
    IntervalStrategy,
    SaveStrategy,
    TrainingArguments,
    UnknownFieldError,
    UnsupportedFieldError,
    check_eval_dataset,
)
from ember.integrations import available_trackers

REPO = Path(__file__).resolve().parents[2]


def make(**kwargs: object) -> TrainingArguments:
    return TrainingArguments(output_dir="out", **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- defaults


@pytest.mark.surface  # compares with the locked transformers; `make compat` reports drift
def test_defaults_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    hf_fields = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = [f for f in dataclasses.fields(TrainingArguments) if f.name in hf_fields]
    assert len(ours) >= 60
    for f in ours:
        hf = hf_fields[f.name]
        if f.default_factory is not dataclasses.MISSING:
            assert hf.default_factory is not dataclasses.MISSING, f.name
            assert f.default_factory() == hf.default_factory(), f.name
        else:
            assert f.default == hf.default, f.name
            assert type(f.default) is type(hf.default), f.name


@pytest.mark.surface  # compares with the locked transformers; `make compat` reports drift
def test_every_transformers_field_exists_and_unsupported_ones_are_transformers_fields() -> None:
    transformers = pytest.importorskip("transformers")
    hf_names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert hf_names - ours == set()
    assert ours - hf_names == {
        "save_async",
        "verify_checkpoints",
        "auto_resume",
        "peer_stall_timeout",
        "flops_per_token",
        "device_peak_flops",
        "chunked_loss",
        "loss_chunk_size",
        "nonfinite_step_policy",
        "max_consecutive_nonfinite_steps",
        "loss_spike_zscore",
        "loss_spike_window",
        "tune_cpu_malloc",
    }
    assert hf_names > UNSUPPORTED_HF_FIELDS


def test_every_field_has_help() -> None:
    for f in dataclasses.fields(TrainingArguments):
        assert len(f.metadata.get("help", "")) > 10, f.name


def test_post_init_fills_defaults() -> None:
    args = TrainingArguments()
    assert args.output_dir == "trainer_output"
    assert args.report_to == []
    assert args.include_num_input_tokens_seen == "no"
    assert args.metric_for_best_model is None and args.greater_is_better is None
    assert args.optim == "adamw_torch_fused"
    assert args.eval_steps is None and args.do_eval is False


def test_positional_output_dir_and_home_expansion() -> None:
    assert TrainingArguments("out").output_dir == "out"
    assert not TrainingArguments("~/x").output_dir.startswith("~")


def test_properties() -> None:
    args = make(per_device_train_batch_size=4, per_device_eval_batch_size=16, use_cpu=True)
    assert (args.train_batch_size, args.eval_batch_size) == (4, 16)
    assert (args.world_size, args.process_index, args.local_process_index) == (1, 0, 0)
    assert args.device == torch.device("cpu")
    assert args.should_save and args.should_log


def test_device_is_cuda_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make().device.type == "cuda"
    assert make(use_cpu=True).device.type == "cpu"


def test_to_dict_is_json_and_round_trips() -> None:
    args = make(
        eval_strategy=IntervalStrategy.STEPS, lr_scheduler_kwargs={"num_cycles": 2}, report_to="jsonl"
    )
    d = json.loads(args.to_json_string())
    assert d["eval_strategy"] == "steps" and type(d["eval_strategy"]) is str
    assert d["report_to"] == ["jsonl"]
    assert TrainingArguments(**d) == args
    assert pickle.loads(pickle.dumps(args)) == args


def test_enum_values_are_stored_as_plain_strings() -> None:
    args = make(save_strategy=SaveStrategy.EPOCH, eval_strategy="epoch")
    assert type(args.save_strategy) is str and args.save_strategy == SaveStrategy.EPOCH


# ---------------------------------------------------------------------------------------------- warmup


@pytest.mark.parametrize(
    ("warmup", "total", "expected"),
    [(0, 100, 0), (10, 100, 10), (10.0, 100, 10), (0.1, 100, 10), (0.25, 10, 3), (0.5, 7, 4)],
)
def test_warmup_count_or_ratio(warmup: float, total: int, expected: int) -> None:
    assert make(warmup_steps=warmup).get_warmup_steps(total) == expected


def test_warmup_steps_count_is_converted_to_int() -> None:
    assert type(make(warmup_steps=5.0).warmup_steps) is int


# ---------------------------------------------------------------------------------------------- names


def test_unknown_keyword_suggests_the_field() -> None:
    with pytest.raises(UnknownFieldError, match="learning_rat.*Did you mean 'learning_rate'"):
        TrainingArguments(learning_rat=1e-3)  # type: ignore[call-arg]


def test_unknown_keyword_is_type_and_value_error() -> None:
    with pytest.raises(TypeError):
        TrainingArguments(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="bogus"):
        TrainingArguments(bogus=1)  # type: ignore[call-arg]


def test_renamed_transformers_field_gets_a_pointer() -> None:
    with pytest.raises(UnknownFieldError, match="warmup_ratio.*warmup_steps"):
        TrainingArguments(warmup_ratio=0.1)  # type: ignore[call-arg]


@pytest.mark.parametrize("name", ["use_cache", "trackio_space_id"])
def test_unsupported_transformers_field(name: str) -> None:
    with pytest.raises(UnsupportedFieldError, match=f"`{name}`"):
        TrainingArguments(**{name: True})  # type: ignore[arg-type]


def test_unsupported_field_also_through_replace() -> None:
    with pytest.raises(UnsupportedFieldError, match="use_cache"):
        dataclasses.replace(make(), use_cache=True)  # type: ignore[call-arg]


def test_subclass_fields_are_known() -> None:
    @dataclasses.dataclass
    class Mine(TrainingArguments):
        use_cache: bool = False
        extra: int = 3

    assert Mine(use_cache=True, extra=4).extra == 4
    with pytest.raises(UnknownFieldError, match="Did you mean 'extra'"):
        Mine(extr=1)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"num_train_epochs": -1}, "num_train_epochs"),
        ({"max_grad_norm": -0.5}, "max_grad_norm"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"adam_beta1": 1.0}, "adam_beta1"),
        ({"adam_beta2": -0.1}, "adam_beta2"),
        ({"label_smoothing_factor": 1.0}, "label_smoothing_factor"),
        ({"label_smoothing_factor": -0.1}, "label_smoothing_factor"),
        ({"save_total_limit": 0}, "save_total_limit"),
        ({"eval_accumulation_steps": 0}, "eval_accumulation_steps"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers"),
        ({"eval_delay": -1}, "eval_delay"),
        ({"flops_per_token": 0.0}, "flops_per_token"),
        ({"logging_steps": 0}, "logging_steps"),
        ({"logging_steps": -5}, "logging_steps"),
        ({"logging_steps": 10.5}, "logging_steps"),
        ({"save_steps": 0}, "save_steps"),
        ({"eval_strategy": "steps", "eval_steps": 0}, "eval_steps"),
        ({"eval_strategy": "steps", "eval_steps": -1}, "eval_steps"),
        ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type"),
        ({"optim": "adamw"}, "optim"),
        ({"eval_strategy": "step"}, "eval_strategy"),
        ({"save_strategy": "bets"}, "save_strategy"),
        ({"logging_strategy": "epochs"}, "logging_strategy"),
        ({"train_sampling_strategy": "group_by_len"}, "train_sampling_strategy"),
        ({"include_num_input_tokens_seen": "some"}, "include_num_input_tokens_seen"),
        ({"include_for_metrics": ["outputs"]}, "include_for_metrics"),
        ({"fp16": True, "bf16": True}, "fp16"),
        ({"dataloader_prefetch_factor": 2}, "dataloader_prefetch_factor"),
        ({"dataloader_persistent_workers": True}, "dataloader_persistent_workers"),
        ({"dataloader_num_workers": 2, "dataloader_prefetch_factor": 0}, "dataloader_prefetch_factor"),
        ({"report_to": "comet_ml"}, "report_to"),
        ({"report_to": ["jsonl", "neptune"]}, "report_to"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"max_steps": 1.5}, "max_steps"),
        ({"bf16": "yes"}, "bf16"),
        ({"label_names": "labels"}, "label_names"),
        ({"lr_scheduler_kwargs": "{not json"}, "lr_scheduler_kwargs"),
        ({"lr_scheduler_kwargs": "[1, 2]"}, "lr_scheduler_kwargs"),
        ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "lr_scheduler_type"),
    ],
)
def test_bad_value_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "suggestion"),
    [
        ({"lr_scheduler_type": "cosin"}, "cosine"),
        ({"optim": "adamw_fused"}, "adamw_torch_fused"),
        ({"eval_strategy": "step"}, "steps"),
        ({"save_strategy": "bets"}, "best"),
        ({"train_sampling_strategy": "group_by_len"}, "group_by_length"),
        ({"include_num_input_tokens_seen": "non-padding"}, "non_padding"),
    ],
)
def test_bad_choice_suggests_closest(kwargs: dict[str, object], suggestion: str) -> None:
    with pytest.raises(ValueError, match=f"Did you mean '{suggestion}'"):
        make(**kwargs)


def test_report_to_unsupported_message() -> None:
    with pytest.raises(ValueError, match="not supported by ember yet"):
        make(report_to="comet_ml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", []),
        (["none"], []),
        ("all", available_trackers()),
        ("jsonl", ["jsonl"]),
        (["jsonl", "all"], available_trackers()),
        (None, []),
    ],
)
def test_report_to_normalised(value: object, expected: list[str]) -> None:
    assert make(report_to=value).report_to == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, "all"), (False, "no"), ("no", "no"), ("all", "all"), ("non_padding", "non_padding")],
)
def test_include_num_input_tokens_seen(value: object, expected: str) -> None:
    assert make(include_num_input_tokens_seen=value).include_num_input_tokens_seen == expected


def test_steps_ratios_allowed_and_counts_made_int() -> None:
    args = make(logging_steps=0.1, save_steps=20.0, eval_strategy="steps", eval_steps=0.05)
    assert (args.logging_steps, args.eval_steps) == (0.1, 0.05)
    assert args.save_steps == 20 and type(args.save_steps) is int


def test_steps_ignored_when_strategy_is_not_steps() -> None:
    assert make(logging_strategy="epoch", logging_steps=0, save_strategy="no", save_steps=-1).save_steps == -1


def test_eval_steps_default_to_logging_steps() -> None:
    args = make(eval_strategy="steps", logging_steps=25)
    assert args.eval_steps == 25 and args.do_eval is True


def test_fp16_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="fp16.*bf16.*GPU"):
        make(fp16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make(fp16=True).fp16
    with pytest.raises(ValueError, match="fp16"):
        make(fp16=True, use_cpu=True)


def test_tf32_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="tf32"):
        make(tf32=True)
    assert make(tf32=False).tf32 is False


def test_bf16_allowed_on_cpu() -> None:
    assert make(bf16=True, use_cpu=True).bf16


def test_lr_scheduler_kwargs_json_string() -> None:
    assert make(lr_scheduler_kwargs='{"num_cycles": 2}').lr_scheduler_kwargs == {"num_cycles": 2}


# ---------------------------------------------------------------------------------------------- best model


def test_load_best_defaults_metric_to_loss() -> None:
    args = make(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch")
    assert args.metric_for_best_model == "loss" and args.greater_is_better is False


@pytest.mark.parametrize(("metric", "greater"), [("accuracy", True), ("eval_loss", False), ("f1", True)])
def test_greater_is_better_from_metric_name(metric: str, greater: bool) -> None:
    assert make(metric_for_best_model=metric).greater_is_better is greater
    assert make(metric_for_best_model=metric, greater_is_better=not greater).greater_is_better is (
        not greater
    )


def test_load_best_requires_matching_strategies() -> None:
    with pytest.raises(ValueError, match="load_best_model_at_end.*save_strategy"):
        make(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps")
    with pytest.raises(ValueError, match="load_best_model_at_end.*eval_strategy"):
        make(load_best_model_at_end=True)


def test_load_best_with_save_best_needs_no_match() -> None:
    assert make(
        load_best_model_at_end=True, eval_strategy="steps", save_strategy="best"
    ).load_best_model_at_end


@pytest.mark.parametrize(
    ("save", "ev", "ok"),
    [
        (100, 50, True),
        (100, 30, False),
        (0.2, 0.1, True),
        (0.3, 0.2, False),
        (100, 0.1, False),
        (0.5, 10, False),
    ],
)
def test_load_best_save_steps_multiple_of_eval_steps(save: float, ev: float, ok: bool) -> None:
    kwargs = {"load_best_model_at_end": True, "eval_strategy": "steps", "save_steps": save, "eval_steps": ev}
    if ok:
        make(**kwargs)
    else:
        with pytest.raises(ValueError, match="save_steps.*eval_steps"):
            make(**kwargs)


def test_check_eval_dataset() -> None:
    check_eval_dataset(make(), has_eval_dataset=False)
    check_eval_dataset(make(eval_strategy="epoch"), has_eval_dataset=True)
    with pytest.raises(ValueError, match="eval_strategy.*eval_dataset"):
        check_eval_dataset(make(eval_strategy="epoch"), has_eval_dataset=False)


# ---------------------------------------------------------------------------------------------- import cost


def test_import_does_not_load_transformers() -> None:
    code = "import ember.args, ember.config, sys; assert 'transformers' not in sys.modules, 'transformers'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# `make compat` runs these against the newest transformers, peft, accelerate and datasets.
pytestmark = pytest.mark.dropin
