"""accelerator_config read as transformers reads it: a dict, a JSON object or file, or an
AcceleratorConfig object; unknown keys and values ember does not run refused before any work;
`to_dict()` written as transformers writes it; the same values through HfArgumentParser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from transformers import HfArgumentParser
from transformers.trainer_pt_utils import AcceleratorConfig as HfAcceleratorConfig

from ember import TrainingArguments
from ember.args import HF_ONLY_FIELDS
from ember.args.accelerator_config import AcceleratorConfig

SET = {
    "split_batches": True,
    "even_batches": False,
    "use_seedable_sampler": False,
    "non_blocking": True,
    "gradient_accumulation_kwargs": {"sync_each_batch": True},
}


def test_no_longer_a_transformers_only_field():
    assert "accelerator_config" not in HF_ONLY_FIELDS and "debug" not in HF_ONLY_FIELDS


@pytest.mark.parametrize("form", ["dict", "json", "file", "hf_object", "ember_object"])
def test_every_form_gives_the_same_config(tmp_path: Path, form: str):
    path = tmp_path / "accelerator_config.json"
    path.write_text(json.dumps(SET))
    raw = {
        "dict": SET,
        "json": json.dumps(SET),
        "file": str(path),
        "hf_object": HfAcceleratorConfig(**SET),
        "ember_object": AcceleratorConfig(**SET),
    }[form]
    config = TrainingArguments(accelerator_config=raw).accelerator_config
    assert isinstance(config, AcceleratorConfig)
    assert (config.split_batches, config.even_batches, config.use_seedable_sampler) == (True, False, False)
    assert config.non_blocking and config.sync_each_batch


def test_to_dict_is_what_transformers_writes_and_round_trips(tmp_path: Path):
    ours = TrainingArguments(output_dir=str(tmp_path), accelerator_config=dict(SET))
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), accelerator_config=dict(SET))
    assert ours.to_dict()["accelerator_config"] == hf.to_dict()["accelerator_config"]
    assert TrainingArguments(**json.loads(ours.to_json_string())) == ours
    assert TrainingArguments(**hf.to_dict()).accelerator_config == ours.accelerator_config
    # Unset: the defaults, as transformers fills them in.
    plain = TrainingArguments(output_dir=str(tmp_path)).to_dict()["accelerator_config"]
    assert plain == transformers.TrainingArguments(output_dir=str(tmp_path)).to_dict()["accelerator_config"]


def test_the_values_parse_through_hf_argument_parser_as_in_transformers(tmp_path: Path):
    flags = [
        "--output_dir",
        str(tmp_path),
        "--accelerator_config",
        json.dumps(
            {
                "split_batches": "true",
                "even_batches": False,
                "gradient_accumulation_kwargs": {"sync_each_batch": True},
            }
        ),
        "--debug",
        "underflow_overflow",
    ]
    (ours,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(flags)
    (hf,) = HfArgumentParser(transformers.TrainingArguments).parse_args_into_dataclasses(flags)
    assert ours.to_dict()["accelerator_config"] == hf.to_dict()["accelerator_config"]
    assert ours.to_dict()["debug"] == hf.to_dict()["debug"] == ["underflow_overflow"]


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"split_batch": True}, ["unknown key 'split_batch'", "Did you mean 'split_batches'"]),
        ({"dispatch_batches": True}, ["dispatch_batches", "each rank reads its own share"]),
        ({"use_configured_state": True}, ["use_configured_state", "no accelerate state"]),
        ({"even_batches": "maybe"}, ["even_batches", "True or False"]),
        ({"gradient_accumulation_kwargs": {"sync_each": True}}, ["Did you mean 'sync_each_batch'"]),
        ({"gradient_accumulation_kwargs": {"sync_each_batch": 1}}, ["sync_each_batch", "True or False"]),
        ("{not json", ["not valid JSON"]),
        ("missing.json", ["neither a JSON object nor a file"]),
        (HfAcceleratorConfig, ["class", "instance"]),
    ],
)
def test_bad_configs_are_refused_naming_the_key(config, words):
    with pytest.raises(ValueError) as info:
        TrainingArguments(accelerator_config=config)
    for word in words:
        assert word in str(info.value)


def test_default_only_keys_are_accepted_at_their_defaults():
    config = TrainingArguments(accelerator_config={"dispatch_batches": None, "use_configured_state": False})
    assert config.accelerator_config == AcceleratorConfig()


def test_num_steps_as_transformers():
    # Taken as the accumulation when gradient_accumulation_steps is left at 1 ...
    args = TrainingArguments(accelerator_config={"gradient_accumulation_kwargs": {"num_steps": 4}})
    assert args.gradient_accumulation_steps == 4
    assert TrainingArguments(**args.to_dict()) == args
    # ... refused when both are set differently, naming the fix.
    with pytest.raises(ValueError, match="set gradient_accumulation_steps only"):
        TrainingArguments(
            gradient_accumulation_steps=2,
            accelerator_config={"gradient_accumulation_kwargs": {"num_steps": 4}},
        )


def test_scheduler_and_dataloader_sync_keys_are_accepted():
    kwargs = {"adjust_scheduler": False, "sync_with_dataloader": False}
    args = TrainingArguments(accelerator_config={"gradient_accumulation_kwargs": kwargs})
    assert args.accelerator_config.gradient_accumulation_kwargs == kwargs


def test_split_batches_that_do_not_divide_are_refused_at_trainer_construction():
    from ember.args.accelerator_config import check_split_batches, rank_batch_size

    args = TrainingArguments(per_device_train_batch_size=6, accelerator_config={"split_batches": True})
    assert rank_batch_size(6, args, 3) == 2 and rank_batch_size(6, args, 1) == 6
    with pytest.raises(ValueError, match=r"per_device_train_batch_size`=6 over 4 .* multiple of 4"):
        check_split_batches(args, 4)
