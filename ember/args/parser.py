"""Build `TrainingArguments` (or any dataclass) from a YAML/JSON file and command-line flags.

Flags are derived from the dataclass fields and their types, so a new field needs no parser code:

    --learning_rate 3e-4          float / int / str
    --bf16 | --bf16 false         bool (a bare flag means true)
    --data_seed none              optional numbers take 'none'
    --label_names start end       lists
    --lr_scheduler_kwargs '{"num_cycles": 2}'   dicts, as JSON objects
    --config run.yaml             values from a file; flags on the command line override them

Precedence, lowest first: field defaults, the `config=` argument, `--config FILE`, flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

from ember.args.training_args import (
    FieldNameError,
    TrainingArguments,
    check_field_names,
    check_supported_values,
    field_value_types,
)

__all__ = ["ArgParser", "ConfigError", "args_from_dict", "dataclass_from_dict", "parse_cli", "parse_config"]

T = TypeVar("T")
ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | None

_TRUE = ("true", "t", "yes", "y", "1", "on")
_FALSE = ("false", "f", "no", "n", "0", "off")
_NONE = ("none", "null")


class ConfigError(ValueError):
    """A config file or command line that cannot be turned into arguments."""


# ---------------------------------------------------------------------------------------------------------
# Files


def parse_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) file whose top level maps field names to values."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        data = _load_yaml(text)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err}).") from None
    else:
        raise ConfigError(f"{path}: unknown config file type {suffix!r}; use .yaml, .yml or .json.")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must map field names to values, got {type(data).__name__}.")
    return data


def _load_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml12_loader())  # noqa: S506 - the loader is a SafeLoader subclass


@cache
def _yaml12_loader() -> type:
    """A SafeLoader with YAML 1.2 scalars: `no`/`off` stay strings and `3e-4` is a float.

    Under PyYAML's YAML 1.1 rules `eval_strategy: no` would be False and `learning_rate: 3e-4` a string,
    both classic surprises in training configs.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    dropped = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {
        first: [r for r in resolvers if r[0] not in dropped]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    float_re = (
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(float_re), list("-+0123456789."))
    return Loader


# ---------------------------------------------------------------------------------------------------------
# Field specs: what kind of value each field takes


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str  # bool, int, float, str, list, dict, str_or_bool, any
    nullable: bool
    default: Any
    help: str
    choices: tuple[str, ...] | None


def _kind_of(hint: Any) -> tuple[str, bool]:
    origin = typing.get_origin(hint)
    members = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    nullable = type(None) in members
    bases = {typing.get_origin(m) or m for m in members if m is not type(None)}
    if list in bases:
        return "list", nullable
    if dict in bases:
        return "dict", nullable
    if bool in bases:
        return ("str_or_bool" if str in bases else "bool"), nullable
    for kind in (int, float, str):
        if kind in bases:
            return kind.__name__, nullable
    if (
        any(isinstance(b, type) and issubclass(b, Enum) for b in bases)
        or typing.get_origin(hint) is typing.Literal
    ):
        return "str", nullable
    return "any", nullable


_SPECS: dict[type, dict[str, _Spec]] = {}


def _specs(cls: type) -> dict[str, _Spec]:
    if cls in _SPECS:
        return _SPECS[cls]
    hints = field_value_types(cls)  # fsdp takes true or a string, report_to a list, ...
    specs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, nullable = _kind_of(hints[f.name])
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        choices = f.metadata.get("choices")
        help_text = str(f.metadata.get("help", ""))
        specs[f.name] = _Spec(f.name, kind, nullable, default, help_text, tuple(choices) if choices else None)
    _SPECS[cls] = specs
    return specs


def _convert(spec: _Spec, text: str) -> Any:
    """Turn one string (a flag value, or a string found in a file) into the field's kind of value."""
    low = text.strip().lower()
    if spec.nullable and low in _NONE and spec.kind not in ("str", "list", "any"):
        return None
    try:
        if spec.kind in ("bool", "str_or_bool"):
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
            if spec.kind == "bool":
                raise ValueError("expected true or false")
            return text
        if spec.kind == "int":
            number = float(text)
            if not number.is_integer():
                raise ValueError("expected a whole number")
            return int(number)
        if spec.kind == "float":
            return float(text)
        if spec.kind == "dict":
            if text.strip().lower().endswith(".json"):
                return text  # a config file (deepspeed, fsdp_config): the field's own check reads it
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
    except ValueError as err:
        raise ConfigError(f"cannot read {text!r} as {spec.kind} ({err}); {_example(spec)}.") from None
    return text


def _example(spec: _Spec) -> str:
    return {
        "bool": "pass true or false",
        "str_or_bool": "pass true, false or one of the listed names",
        "int": "pass a whole number such as 8",
        "float": "pass a number such as 3e-4",
        "dict": "pass a JSON object such as '{\"key\": 1}'",
    }.get(spec.kind, "check the value")


# ---------------------------------------------------------------------------------------------------------
# Dicts


def dataclass_from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build `cls` from a mapping, reading strings as the field's type (e.g. '3e-4' for a float)."""
    check_field_names(values, cls)
    specs = _specs(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        spec = specs[name]
        if isinstance(value, str) and spec.kind not in ("str", "list", "any"):
            try:
                value = _convert(spec, value)
            except ConfigError as err:
                raise ConfigError(f"`{name}`: {err}") from None
        elif spec.kind == "list" and isinstance(value, str):
            value = [value] if value else []
        kwargs[name] = value
    return cls(**kwargs)


def args_from_dict(values: Mapping[str, Any]) -> TrainingArguments:
    """`TrainingArguments` from a mapping (such as `parse_config`'s); unknown names are errors."""
    return dataclass_from_dict(TrainingArguments, values)


def _load_source(source: ConfigSource, cls: type) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        check_field_names(source, cls)
        return dict(source)
    values = parse_config(source)
    try:
        check_field_names(values, cls)
        check_supported_values(values, cls)
    except FieldNameError as err:
        raise type(err)(f"{source}: {err}") from None
    return values


# ---------------------------------------------------------------------------------------------------------
# Command line


class ArgParser(argparse.ArgumentParser, Generic[T]):
    """An argparse parser with one flag per field of a dataclass (TrainingArguments by default)."""

    def __init__(self, dataclass_type: type[T] = TrainingArguments, **kwargs: Any) -> None:  # type: ignore[assignment]
        kwargs.setdefault("usage", "%(prog)s [--config FILE] [--FIELD VALUE ...]")
        kwargs.setdefault(
            "description", f"Fields of {dataclass_type.__name__}; flags override --config values."
        )
        super().__init__(allow_abbrev=False, **kwargs)
        self.dataclass_type = dataclass_type
        self._has_config_flag = "config" not in _specs(dataclass_type)
        if self._has_config_flag:
            self.add_argument(
                "--config",
                default=argparse.SUPPRESS,
                metavar="FILE",
                help="YAML or JSON file of field values; flags given here override it.",
            )
        for spec in _specs(dataclass_type).values():
            self._add_field(spec)

    def _add_field(self, spec: _Spec) -> None:
        help_text = spec.help
        if spec.choices:
            help_text += f" Choices: {', '.join(spec.choices)}."
        default = "required" if spec.default is MISSING else repr(spec.default)
        help_text = f"{help_text} [default: {default}]".strip().replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
        if spec.kind == "list":
            kwargs.update(nargs="*", metavar="STR")
        elif spec.kind in ("bool", "str_or_bool"):
            kwargs.update(
                nargs="?",
                const=True,
                metavar="BOOL" if spec.kind == "bool" else "VALUE",
                type=_arg_type(spec),
            )
        else:
            metavar = {"int": "INT", "float": "FLOAT", "dict": "JSON"}.get(spec.kind, "STR")
            kwargs.update(metavar=metavar, type=_arg_type(spec))
        self.add_argument(f"--{spec.name}", **kwargs)
        if spec.kind == "bool" and spec.default is True:
            # HfArgumentParser's spelling for turning off a flag that defaults to true
            self.add_argument(
                f"--no_{spec.name}",
                dest=spec.name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=f"Set {spec.name} to false.",
            )

    def error(self, message: str) -> typing.NoReturn:
        # Raise instead of exiting, so library callers can catch it; `ember` CLI prints it.
        raise ConfigError(f"{message} (see --help)")

    def parse_into_dict(
        self, argv: Sequence[str] | None = None, config: ConfigSource = None
    ) -> dict[str, Any]:
        """Field values from `config`, then `--config FILE`, then flags: later ones win."""
        argv = _normalise_flags(list(sys.argv[1:] if argv is None else argv))
        namespace, rest = self.parse_known_args(argv)
        _reject_leftovers(rest, self.dataclass_type)
        flags = vars(namespace)
        values = _load_source(config, self.dataclass_type)
        if self._has_config_flag and "config" in flags:
            values.update(_load_source(flags.pop("config"), self.dataclass_type))
        values.update(flags)
        return values

    def parse_into_dataclass(self, argv: Sequence[str] | None = None, config: ConfigSource = None) -> T:
        return dataclass_from_dict(self.dataclass_type, self.parse_into_dict(argv, config))


def _arg_type(spec: _Spec) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return _convert(spec, text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = spec.kind  # argparse names the type in some messages
    return convert


def _normalise_flags(argv: list[str]) -> list[str]:
    """Accept `--learning-rate` for `--learning_rate`, as transformers' parser does."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token[2:].partition("=")
            token = f"--{name.replace('-', '_')}{sep}{value}"
        out.append(token)
    return out


def _reject_leftovers(rest: list[str], cls: type) -> None:
    for token in rest:
        if token.startswith("-") and not parses_as_float(token):
            check_field_names([token.lstrip("-").partition("=")[0]], cls)
    if rest:
        raise ConfigError(
            f"unexpected command-line arguments {rest!r}; every value must follow a --FIELD flag."
        )


def parses_as_float(value: Any) -> bool:
    """`float(value)` works: a number, or a string such as "1e-3" or "nan"."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_cli(argv: Sequence[str] | None = None, config: ConfigSource = None) -> TrainingArguments:
    """`TrainingArguments` from flags (default: sys.argv[1:]) over an optional file or dict of values."""
    return ArgParser(TrainingArguments).parse_into_dataclass(argv, config)
