"""Drop-in fidelity of TrainingArguments: transformers' HfArgumentParser, to_dict() and helper members.

Every test runs the real transformers (HfArgumentParser, TrainingArguments) next to ember's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.args import (
    HF_ONLY_FIELDS,
    ParallelMode,
    TrainingArguments,
    UnsupportedFieldError,
    unsupported_value_error,
)
from ember.args.parser import parse_cli
from tests.strategy import launch

transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")


@dataclasses.dataclass
class ModelArguments:
    model_name_or_path: str = dataclasses.field(default="tiny", metadata={"help": "model"})
    cache_dir: str | None = None


@dataclasses.dataclass
class DataTrainingArguments:
    max_seq_length: int = 128
    task_name: str | None = None
    pad_to_max_length: bool = True


def hf_parser() -> Any:
    return transformers.HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))


def parse(argv: list[str]) -> TrainingArguments:
    _, _, args = hf_parser().parse_args_into_dataclasses(args=argv)
    assert isinstance(args, TrainingArguments)
    return args


@pytest.fixture(autouse=True)
def _keep_ember_log_level() -> Iterator[None]:
    logger = logging.getLogger("ember")
    level = logger.level
    yield
    logger.setLevel(level)


# ---------------------------------------------------------------------------------------------- parsing


def test_parser_builds_over_an_hf_script_dataclass_triple() -> None:
    model, data, args = hf_parser().parse_args_into_dataclasses(
        args=["--model_name_or_path", "m", "--task_name", "mrpc", "--output_dir", "out", "--do_train"]
    )
    assert (model.model_name_or_path, data.task_name, args.output_dir, args.do_train) == (
        "m",
        "mrpc",
        "out",
        True,
    )
    assert args == TrainingArguments(output_dir="out", do_train=True)


def test_cli_values_of_every_kind() -> None:
    args = parse(
        [
            "--output_dir", "out",
            "--report_to", "none",
            "--label_names", "start_positions", "end_positions",
            "--include_for_metrics", "inputs", "loss",
            "--do_train", "--do_eval",
            "--bf16", "False",
            "--no_remove_unused_columns", "--no_dataloader_pin_memory", "--no_logging_nan_inf_filter",
            "--learning_rate", "3e-4", "--num_train_epochs", "1.5", "--warmup_steps", "0.1",
            "--data_seed", "7", "--save_total_limit", "2",
            "--lr_scheduler_type", "cosine", "--optim", "sgd",
            "--eval_strategy", "steps", "--eval_steps", "10",
            "--include_num_input_tokens_seen", "true",
            "--lr_scheduler_kwargs", '{"num_cycles": 2}',
            "--log_level", "info",
        ]
    )  # fmt: skip
    assert args.report_to == []
    assert args.label_names == ["start_positions", "end_positions"]
    assert args.include_for_metrics == ["inputs", "loss"]
    assert (args.do_train, args.do_eval, args.bf16) == (True, True, False)
    assert (args.remove_unused_columns, args.dataloader_pin_memory, args.logging_nan_inf_filter) == (
        False,
    ) * 3
    assert (args.learning_rate, args.num_train_epochs, args.warmup_steps) == (3e-4, 1.5, 0.1)
    assert (args.data_seed, args.save_total_limit) == (7, 2)
    assert (args.lr_scheduler_type, args.optim, args.eval_strategy, args.eval_steps) == (
        "cosine",
        "sgd",
        "steps",
        10,
    )
    assert args.include_num_input_tokens_seen == "all"
    assert args.lr_scheduler_kwargs == {"num_cycles": 2}
    assert args.log_level == "info"


def test_cli_several_report_to_backends_and_booleans_as_words() -> None:
    args = parse(["--report_to", "jsonl", "jsonl", "--bf16", "true", "--use_cpu", "yes"])
    assert args.report_to == ["jsonl"] and args.bf16 and args.use_cpu


def test_cli_defaults_equal_the_dataclass_defaults() -> None:
    assert parse([]) == TrainingArguments()


def test_cli_fsdp_bare_flag_and_json_config() -> None:
    args = parse(["--fsdp", "--fsdp_config", '{"reshard_after_forward": false}'])
    assert args.fsdp is True and args.fsdp_config == {"reshard_after_forward": False}
    assert parse(["--fsdp", "full_shard offload"]).fsdp_config == {
        "reshard_after_forward": True,
        "cpu_offload": True,
    }


def test_cli_deepspeed_json_object_and_file(tmp_path: Path) -> None:
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    assert parse(["--deepspeed", json.dumps(config)]).deepspeed == config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    assert parse(["--deepspeed", str(path)]).deepspeed == str(path)


def test_cli_refuses_a_choice_ember_lacks() -> None:
    with pytest.raises(SystemExit):
        parse(["--lr_scheduler_type", "greedy"])


def test_json_and_yaml_files(tmp_path: Path) -> None:
    values = {
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "label_names": ["labels"],
        "learning_rate": 1e-3,
        "remove_unused_columns": False,
        "eval_strategy": "epoch",
        "lr_scheduler_kwargs": {"num_cycles": 3},
        "data_seed": None,
        "push_to_hub": False,
        "log_level": "passive",
    }
    json_path = tmp_path / "args.json"
    json_path.write_text(json.dumps(values))
    yaml_path = tmp_path / "args.yaml"
    yaml_path.write_text(yaml.safe_dump(values))
    expected = TrainingArguments(**values)
    (from_json,) = transformers.HfArgumentParser(TrainingArguments).parse_json_file(str(json_path))
    (from_yaml,) = transformers.HfArgumentParser(TrainingArguments).parse_yaml_file(str(yaml_path))
    assert from_json == expected == from_yaml
    assert from_json.lr_scheduler_kwargs == {"num_cycles": 3} and from_json.do_eval


def test_help_lists_the_transformers_only_fields() -> None:
    text = transformers.HfArgumentParser(TrainingArguments).format_help()
    for flag in (
        "--push_to_hub",
        "--torch_compile",
        "--hub_model_id",
        "--auto_find_batch_size",
        "--no_remove_unused_columns",
    ):
        assert flag in text


def test_ember_parser_reads_the_same_flags() -> None:
    argv = [
        "--report_to",
        "none",
        "--fsdp",
        "--label_names",
        "a",
        "b",
        "--include_num_input_tokens_seen",
        "true",
    ]
    assert parse_cli(argv) == parse(argv)


# ------------------------------------------------------------------------------ transformers-only fields


def test_hf_only_defaults_equal_installed_transformers() -> None:
    hf = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    for name in HF_ONLY_FIELDS:
        assert ours[name].default == hf[name].default, name
        assert type(ours[name].default) is type(hf[name].default), name


def test_transformers_to_dict_builds_ember_args(tmp_path: Path) -> None:
    hf = transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, eval_strategy="steps", eval_steps=5, report_to="none"
    )
    args = TrainingArguments(**hf.to_dict())
    assert (args.learning_rate, args.eval_strategy, args.eval_steps, args.do_eval) == (1e-3, "steps", 5, True)
    # transformers' spellings of the defaults are stored as ember's declared defaults; debug and
    # accelerator_config are read as transformers reads them (a list, a config of the defaults)
    assert (args.hub_token, args.debug) == (None, [])
    assert args.accelerator_config.to_dict() == hf.to_dict()["accelerator_config"]
    # checkpointing resolves its alias as transformers does: unset is False on both names
    assert (args.activation_checkpointing, args.gradient_checkpointing) == (False, False)
    assert TrainingArguments(**args.to_dict()) == args


def test_scripts_read_hub_fields_at_their_defaults() -> None:
    args = TrainingArguments()
    assert args.push_to_hub is False and args.hub_model_id is None and args.hub_strategy == "every_save"


def _fails_same_way(error: type[Exception], expected: str, attempts: dict[str, Callable[[], object]]) -> None:
    for path, attempt in attempts.items():
        with pytest.raises(error) as info:
            attempt()
        assert str(info.value).endswith(expected), (path, str(info.value))


def _entry_paths(tmp_path: Path, name: str, value: Any, flags: list[str]) -> dict[str, Callable[[], object]]:
    json_path = tmp_path / "a.json"
    json_path.write_text(json.dumps({name: value}))
    yaml_path = tmp_path / "a.yaml"
    yaml_path.write_text(yaml.safe_dump({name: value}))
    one = transformers.HfArgumentParser(TrainingArguments)
    return {
        "python": lambda: TrainingArguments(**{name: value}),
        "hf cli": lambda: parse(flags),
        "hf json": lambda: one.parse_json_file(str(json_path)),
        "hf yaml": lambda: one.parse_yaml_file(str(yaml_path)),
        "ember yaml": lambda: parse_cli([], config=yaml_path),
        "ember cli": lambda: parse_cli(flags),
    }


@pytest.mark.parametrize(
    ("name", "value", "flags"),
    [
        ("use_cache", True, ["--use_cache"]),
        ("trackio_space_id", "me/space", ["--trackio_space_id", "me/space"]),
        ("project", "mine", ["--project", "mine"]),
    ],
)
def test_unsupported_option_gets_one_message_on_every_path(
    tmp_path: Path, name: str, value: Any, flags: list[str]
) -> None:
    expected = str(unsupported_value_error(name, value))
    assert f"`{name}`" in expected and "instead" in expected
    _fails_same_way(UnsupportedFieldError, expected, _entry_paths(tmp_path, name, value, flags))


def test_fp16_on_cpu_gets_one_message_on_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="fp16") as info:
        TrainingArguments(fp16=True)
    _fails_same_way(ValueError, str(info.value), _entry_paths(tmp_path, "fp16", True, ["--fp16"]))


def test_subclass_that_redeclares_a_field_implements_it() -> None:
    @dataclasses.dataclass
    class WithCompile(TrainingArguments):
        torch_compile: bool = dataclasses.field(default=False, metadata={"help": "compile it myself"})

    assert WithCompile(torch_compile=True).torch_compile is True


# ------------------------------------------------------------------------------ save_strategy="best"


def test_save_best_needs_a_metric() -> None:
    with pytest.raises(ValueError, match="save_strategy='best'.*metric_for_best_model"):
        TrainingArguments(save_strategy="best")
    assert TrainingArguments(save_strategy="best", metric_for_best_model="accuracy").greater_is_better is True


def test_save_best_with_load_best_fills_loss_like_transformers(tmp_path: Path) -> None:
    kwargs = {"save_strategy": "best", "eval_strategy": "steps", "load_best_model_at_end": True}
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), **kwargs)
    ours = TrainingArguments(**kwargs)
    assert ours.metric_for_best_model == hf.metric_for_best_model == "loss"
    assert ours.greater_is_better is hf.greater_is_better is False


# ---------------------------------------------------------------------------------------------- members


def test_public_members_match_transformers() -> None:
    hf_fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    hf_members = {n for n in dir(transformers.TrainingArguments) if not n.startswith("_")} - hf_fields
    # Left out on purpose: transformers' own version flag, an optim default for its subclasses, and a hook
    # ember's Trainer does not read (the strategy places the model).
    absent = {"is_torch_greater_or_equal_than_2_8", "default_optim", "place_model_on_device"}
    assert hf_members - set(dir(TrainingArguments)) == absent


def test_log_level_sets_the_ember_logger_and_process_level() -> None:
    args = TrainingArguments(log_level="info")
    assert args.get_process_log_level() == logging.INFO == logging.getLogger("ember").level
    logging.getLogger("ember").setLevel(logging.ERROR)
    assert TrainingArguments().get_process_log_level() == logging.ERROR  # passive: leave it as it is
    assert logging.getLogger("ember").level == logging.ERROR
    with pytest.raises(ValueError, match="log_level.*Choose one of"):
        TrainingArguments(log_level="loud")


def test_replica_log_level_and_log_on_each_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # main process of the second machine
    args = TrainingArguments(log_level="debug", log_level_replica="error")
    assert args.should_log and args.get_process_log_level() == logging.DEBUG
    args = TrainingArguments(log_level="debug", log_level_replica="error", log_on_each_node=False)
    assert not args.should_log and args.get_process_log_level() == logging.ERROR
    assert (
        args.parallel_mode == ParallelMode.DISTRIBUTED == transformers.training_args.ParallelMode.DISTRIBUTED
    )


def test_single_process_members() -> None:
    args = TrainingArguments(ddp_timeout=60)
    assert args.parallel_mode == transformers.training_args.ParallelMode.NOT_PARALLEL
    assert args.ddp_timeout_delta.total_seconds() == 60
    ran = []
    with args.main_process_first(desc="tokenize"):
        ran.append(1)
    assert ran == [1]


def test_to_sanitized_dict_matches_transformers_keys(tmp_path: Path) -> None:
    hf = transformers.TrainingArguments(output_dir=str(tmp_path)).to_sanitized_dict()
    ours = TrainingArguments(output_dir=str(tmp_path), lr_scheduler_kwargs={"a": 1}).to_sanitized_dict()
    assert set(hf) <= set(ours)
    assert all(type(v) in (bool, int, float, str) for v in ours.values())
    assert ours["lr_scheduler_kwargs"] == "{'a': 1}" and ours["train_batch_size"] == 8


def _calls() -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            "set_training",
            {"learning_rate": 1e-3, "batch_size": 4, "num_epochs": 2, "seed": 3, "max_steps": 50},
        ),
        ("set_evaluate", {"strategy": "steps", "steps": 10, "batch_size": 2, "accumulation_steps": 3}),
        ("set_save", {"strategy": "steps", "steps": 20, "total_limit": 2}),
        ("set_logging", {"strategy": "steps", "steps": 5, "level": "info", "first_step": True}),
        ("set_optimizer", {"name": "sgd", "learning_rate": 0.1, "weight_decay": 0.01}),
        ("set_lr_scheduler", {"name": "cosine", "num_epochs": 2, "max_steps": 50, "warmup_steps": 0.1}),
        (
            "set_dataloader",
            {"train_batch_size": 2, "eval_batch_size": 4, "drop_last": True, "sampler_seed": 5},
        ),
        ("set_testing", {"batch_size": 3, "loss_only": True}),
    ]


def test_grouped_setters_set_what_transformers_sets(tmp_path: Path) -> None:
    hf = transformers.TrainingArguments(output_dir=str(tmp_path))
    ours = TrainingArguments(output_dir=str(tmp_path))
    for method, kwargs in _calls():
        getattr(hf, method)(**kwargs)
        assert getattr(ours, method)(**kwargs) is ours
    hf_dict, ours_dict = hf.to_dict(), ours.to_dict()
    # Stored differently for the same meaning: eval_delay None (read as 0), the token mask, accelerate's
    # config object, and debug/checkpointing resolved to []/False by transformers.
    spelled_differently = {"eval_delay", "hub_token", "report_to"}
    spelled_differently |= {"activation_checkpointing", "gradient_checkpointing"}
    differ = {k for k in hf_dict if k not in spelled_differently and hf_dict[k] != ours_dict[k]}
    assert differ == set(), {k: (hf_dict[k], ours_dict[k]) for k in differ}
    assert ours.do_train and ours.do_eval and ours.do_predict and ours.optim == "sgd"
    assert (hf.report_to, ours.report_to) == ("none", [])  # set_logging skips transformers' normalisation


def test_setter_with_a_bad_value_raises_and_changes_nothing() -> None:
    args = TrainingArguments()
    before = args.to_dict()
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        args.set_training(batch_size=0)
    with pytest.raises(ValueError, match="hub_strategy"):
        args.set_push_to_hub("me/model", strategy="sometimes")
    with pytest.raises(ValueError, match="save_total_limit"):
        args.set_save(total_limit=-1, on_each_node=True)
    assert args.to_dict() == before


MAIN_FIRST_JOB = """
import os, sys, time, torch.distributed as dist
from ember.args import TrainingArguments
dist.init_process_group("gloo")
args = TrainingArguments(output_dir=sys.argv[1])
marker = os.path.join(sys.argv[1], "done")
with args.main_process_first(desc="prepare"):
    if args.process_index == 0:
        time.sleep(1.0)  # without the barrier the other rank would look before this file exists
        open(marker, "w").close()
    else:
        assert os.path.exists(marker), "rank 1 ran before the main process finished"
assert args.parallel_mode.value == "distributed" and args.world_size == 2
dist.destroy_process_group()
"""


def test_main_process_first_orders_two_processes(tmp_path: Path) -> None:
    launch.check(launch.run(["-c", MAIN_FIRST_JOB, str(tmp_path)], nproc=2, timeout=120))


def test_import_ember_does_not_import_transformers() -> None:
    import subprocess

    code = "import sys, ember; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_chunked_loss_is_unset_true_or_false_from_the_command_line() -> None:
    parser = transformers.HfArgumentParser(TrainingArguments)
    base = ["--output_dir", "x", "--report_to", "none"]
    for extra, expected in (([], None), (["--chunked_loss"], True), (["--chunked_loss", "false"], False)):
        assert parser.parse_args_into_dataclasses(args=base + extra)[0].chunked_loss is expected


# `make compat` runs these against the newest transformers, peft, accelerate and datasets.
pytestmark = pytest.mark.dropin
