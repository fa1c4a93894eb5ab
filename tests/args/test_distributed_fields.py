"""The distributed fields of TrainingArguments (ember/args/distributed.py): transformers' names and
defaults, checked values, errors that name the field; DeepSpeed "auto" values filled from the
arguments."""

from __future__ import annotations

import json

import pytest
import torch

from ember import TrainingArguments
from ember.strategy import build_strategy
from ember.strategy.deepspeed import resolve_config


def test_transformers_defaults():
    args = TrainingArguments()
    assert args.ddp_timeout == 1800
    assert (args.ddp_backend, args.ddp_find_unused_parameters, args.ddp_bucket_cap_mb) == (None, None, None)
    assert (args.ddp_broadcast_buffers, args.fsdp, args.fsdp_config, args.deepspeed) == (
        None,
        None,
        None,
        None,
    )


def test_world_size_and_rank_come_from_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = TrainingArguments()
    assert (args.world_size, args.process_index, args.local_process_index) == (4, 3, 1)
    assert not args.should_save


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ddp_backend": "ncl"}, "ddp_backend"),
        ({"ddp_timeout": 0}, "ddp_timeout"),
        ({"ddp_bucket_cap_mb": -1}, "ddp_bucket_cap_mb"),
        ({"fsdp_config": {"reshard_after_forward": False}}, "fsdp_config"),
        ({"fsdp": "full_shard hybrid_shard"}, "fsdp"),
        ({"fsdp": "full_shrad"}, "fsdp"),
        ({"fsdp": True, "fsdp_config": {"backward_prefetch": "BACKWARD_PRE"}}, "backward_prefetch"),
        ({"fsdp": True, "fsdp_config": {"reshard_after_fwd": True}}, "reshard_after_forward"),
        ({"fsdp": True, "fsdp_config": {"version": 1}}, "version"),
        ({"fsdp": True, "fsdp_config": {"state_dict_type": "LOCAL"}}, "state_dict_type"),
        ({"fsdp": True, "deepspeed": {"zero_optimization": {"stage": 2}}}, "deepspeed"),
        ({"deepspeed": "/no/such/ds_config.json"}, "deepspeed"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainingArguments(**kwargs)


def test_legacy_fsdp_string_and_prefixed_config_keys_are_normalised(tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(
        json.dumps(
            {"fsdp_activation_checkpointing": "true", "fsdp_transformer_layer_cls_to_wrap": "GPT2Block"}
        )
    )
    args = TrainingArguments(fsdp="shard_grad_op offload auto_wrap", fsdp_config=str(path))
    assert args.fsdp is True
    assert args.fsdp_config == {
        "activation_checkpointing": True,
        "transformer_layer_cls_to_wrap": ["GPT2Block"],
        "reshard_after_forward": False,
        "cpu_offload": True,
    }


def test_deepspeed_config_file_is_accepted_from_the_command_line(tmp_path):
    from ember.args.parser import parse_cli

    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert parse_cli(["--deepspeed", str(path)]).deepspeed == str(path)


def test_one_process_without_fsdp_or_deepspeed_is_single_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    strategy = build_strategy(TrainingArguments(use_cpu=True))
    assert (type(strategy).__name__, strategy.world_size, strategy.any_rank(True)) == (
        "SingleDevice",
        1,
        True,
    )


def _ds_args(**kw):
    base = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=True)
    return TrainingArguments(**{**base, **kw})


def test_deepspeed_auto_values_come_from_the_arguments():
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    }
    out = resolve_config(_ds_args(deepspeed=config), world_size=2, hidden_size=64, dtype=torch.bfloat16)
    assert out["train_micro_batch_size_per_gpu"] == 4 and out["train_batch_size"] == 16
    assert out["gradient_accumulation_steps"] == 2 and out["gradient_clipping"] == 0.5
    assert out["bf16"] == {"enabled": True}
    assert out["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert "optimizer" not in out  # ember builds the optimizer from the arguments


def test_deepspeed_values_that_contradict_the_arguments_are_named():
    with pytest.raises(
        ValueError, match="train_micro_batch_size_per_gpu=8 but per_device_train_batch_size=4"
    ):
        resolve_config(
            _ds_args(deepspeed={"train_micro_batch_size_per_gpu": 8}),
            world_size=1,
            hidden_size=None,
            dtype=None,
        )
    with pytest.raises(ValueError, match="optimizer section sets"):
        resolve_config(
            _ds_args(deepspeed={"optimizer": {"params": {"lr": 1e-3}}}),
            world_size=1,
            hidden_size=None,
            dtype=None,
        )
