from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from ember.args import TrainingArguments, UnknownFieldError, UnsupportedFieldError
from ember.args.parser import ArgParser, ConfigError, args_from_dict, parse_cli, parse_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- files

YAML = """
output_dir: run
learning_rate: 3e-4
num_train_epochs: 2
eval_strategy: no
save_strategy: epoch
report_to: jsonl
label_names: labels
lr_scheduler_kwargs: {num_cycles: 2}
bf16: true
"""


def test_yaml_file(tmp_path: Path) -> None:
    args = args_from_dict(parse_config(write(tmp_path, "c.yaml", YAML)))
    # YAML 1.1 would read `3e-4` as a string and `no` as False; both must come out right.
    assert args.learning_rate == 3e-4
    assert args.eval_strategy == "no"
    assert args.num_train_epochs == 2 and args.save_strategy == "epoch"
    assert args.report_to == ["jsonl"] and args.label_names == ["labels"]
    assert args.lr_scheduler_kwargs == {"num_cycles": 2} and args.bf16 is True


def test_json_file(tmp_path: Path) -> None:
    data = {"output_dir": "run", "learning_rate": 1e-3, "max_steps": 10, "label_names": ["a", "b"]}
    args = args_from_dict(parse_config(write(tmp_path, "c.json", json.dumps(data))))
    assert (args.learning_rate, args.max_steps, args.label_names) == (1e-3, 10, ["a", "b"])


def test_to_json_string_round_trips_through_file(tmp_path: Path) -> None:
    args = TrainingArguments("out", learning_rate=1e-4, eval_strategy="steps", eval_steps=5)
    again = args_from_dict(parse_config(write(tmp_path, "a.json", args.to_json_string())))
    assert again == args


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    assert parse_config(write(tmp_path, "e.yml", "")) == {}


@pytest.mark.parametrize(
    ("name", "text"), [("c.toml", "a = 1"), ("c.yaml", "- 1\n- 2\n"), ("c.json", "{oops")]
)
def test_bad_files(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(ConfigError, match=name):
        parse_config(write(tmp_path, name, text))


def test_dict_strings_are_read_as_field_types() -> None:
    args = args_from_dict({"learning_rate": "1e-3", "max_steps": "20", "bf16": "false", "data_seed": "none"})
    assert (args.learning_rate, args.max_steps, args.bf16, args.data_seed) == (1e-3, 20, False, None)
    with pytest.raises(ConfigError, match="learning_rate"):
        args_from_dict({"learning_rate": "fast"})


def test_dict_unknown_and_unsupported_names() -> None:
    with pytest.raises(UnknownFieldError, match="Did you mean 'per_device_train_batch_size'"):
        args_from_dict({"per_device_train_batchsize": 4})
    with pytest.raises(UnsupportedFieldError, match="use_cache"):
        args_from_dict({"use_cache": True})


def test_file_name_errors_mention_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "use_cache: true\n")
    with pytest.raises(UnsupportedFieldError, match=r"c\.yaml.*use_cache"):
        parse_cli([], config=path)


# ---------------------------------------------------------------------------------------------- flags


def test_cli_scalar_types() -> None:
    args = parse_cli(
        ["--learning_rate", "3e-4", "--max_steps", "12", "--optim", "sgd", "--warmup_steps", "0.1"]
    )
    assert args.learning_rate == 3e-4 and type(args.max_steps) is int and args.max_steps == 12
    assert args.optim == "sgd" and args.warmup_steps == 0.1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--bf16"], True),
        (["--bf16", "true"], True),
        (["--bf16", "false"], False),
        (["--bf16", "False"], False),
        (["--bf16=yes"], True),
        ([], False),
    ],
)
def test_cli_bool_forms(argv: list[str], expected: bool) -> None:
    assert parse_cli(argv).bf16 is expected


def test_cli_bare_bool_before_another_flag() -> None:
    args = parse_cli(["--bf16", "--logging_first_step", "--max_steps", "3"])
    assert args.bf16 and args.logging_first_step and args.max_steps == 3


def test_cli_lists_and_report_to() -> None:
    args = parse_cli(["--label_names", "start", "end", "--report_to", "none"])
    assert args.label_names == ["start", "end"] and args.report_to == []
    assert parse_cli(["--report_to", "jsonl"]).report_to == ["jsonl"]
    assert parse_cli(["--include_for_metrics", "inputs", "loss"]).include_for_metrics == ["inputs", "loss"]


def test_cli_dict_as_json() -> None:
    args = parse_cli(["--lr_scheduler_kwargs", '{"num_cycles": 3, "min_lr": 1e-6}'])
    assert args.lr_scheduler_kwargs == {"num_cycles": 3, "min_lr": 1e-6}
    with pytest.raises(ConfigError, match="lr_scheduler_kwargs.*JSON object"):
        parse_cli(["--lr_scheduler_kwargs", "[1]"])


def test_cli_optional_numbers() -> None:
    assert parse_cli(["--data_seed", "7"]).data_seed == 7
    assert parse_cli(["--data_seed", "none"]).data_seed is None
    assert parse_cli(["--save_total_limit", "2"]).save_total_limit == 2
    assert parse_cli(["--tf32", "none"]).tf32 is None
    assert parse_cli(["--eval_strategy", "steps", "--eval_steps", "0.25"]).eval_steps == 0.25


def test_cli_str_or_bool_field() -> None:
    assert parse_cli(["--include_num_input_tokens_seen"]).include_num_input_tokens_seen == "all"
    assert (
        parse_cli(["--include_num_input_tokens_seen", "non_padding"]).include_num_input_tokens_seen
        == "non_padding"
    )
    assert parse_cli(["--include_num_input_tokens_seen", "no"]).include_num_input_tokens_seen == "no"


def test_cli_dashes_accepted() -> None:
    assert (
        parse_cli(["--learning-rate", "0.5", "--per-device-train-batch-size=3"]).per_device_train_batch_size
        == 3
    )


@pytest.mark.parametrize(
    ("argv", "error", "pattern"),
    [
        (["--learning_rat", "1e-3"], UnknownFieldError, "Did you mean 'learning_rate'"),
        (["--learning_rat=1e-3"], UnknownFieldError, "learning_rate"),
        (["--use_cache"], UnsupportedFieldError, "use_cache"),
        (["--learning_rate", "fast"], ConfigError, "learning_rate"),
        (["--max_steps", "1.5"], ConfigError, "max_steps"),
        (["--bf16", "maybe"], ConfigError, "bf16"),
        (["stray"], ConfigError, "stray"),
        (["--eval_strategy", "step"], ValueError, "Did you mean 'steps'"),
    ],
)
def test_cli_errors(argv: list[str], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        parse_cli(argv)


def test_no_prefix_abbreviations() -> None:
    with pytest.raises(UnknownFieldError):
        parse_cli(["--learning", "0.1"])


# ---------------------------------------------------------------------------------------------- precedence


def test_cli_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", YAML)
    args = parse_cli(["--learning_rate", "1e-2", "--bf16", "false"], config=path)
    assert args.learning_rate == 1e-2 and args.bf16 is False
    assert args.num_train_epochs == 2 and args.output_dir == "run"


def test_config_flag_and_layering(tmp_path: Path) -> None:
    base = {"learning_rate": 1.0, "max_steps": 5, "seed": 1}
    path = write(tmp_path, "c.json", json.dumps({"max_steps": 6, "seed": 2}))
    args = parse_cli(["--config", str(path), "--seed", "3"], config=base)
    assert (args.learning_rate, args.max_steps, args.seed) == (1.0, 6, 3)


# ---------------------------------------------------------------------------------------------- help


def test_help_lists_every_field_with_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    names = [f.name for f in dataclasses.fields(TrainingArguments)]
    starts = []
    for name in names:
        match = re.search(rf"--{name} ", text)
        assert match, name
        starts.append(match.start())
    assert starts == sorted(starts)
    for i, f in enumerate(dataclasses.fields(TrainingArguments)):
        chunk = text[starts[i] : starts[i + 1] if i + 1 < len(starts) else len(text)]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert f"[default: {default!r}]" in chunk, f.name
        assert " ".join(f.metadata["help"].split()[:3]) in chunk, f.name


# ------------------------------------------------------------------------------------- other dataclasses


@dataclasses.dataclass
class ScriptArgs:
    model_name: str = "tiny"
    layers: int = 2
    dropout: float | None = None
    tags: list[str] = dataclasses.field(default_factory=list)


def test_parser_works_for_any_dataclass() -> None:
    parser = ArgParser(ScriptArgs)
    parsed = parser.parse_into_dataclass(["--layers", "4", "--dropout", "0.1", "--tags", "a"])
    assert parsed == ScriptArgs(layers=4, dropout=0.1, tags=["a"])
    with pytest.raises(UnknownFieldError, match="Did you mean 'layers'"):
        parser.parse_into_dataclass(["--layer", "4"])
