"""transformers' fields that ember does not implement, and the checks that keep them at their
defaults: a script written for transformers runs unchanged until it sets one, and then gets an
error that names the field and what to do instead. Also the errors for unknown field names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import fields
from functools import cache
from typing import Any

from .fields import TrainingFields

# Fields of transformers 5.24's TrainingArguments that ember does not implement, each with what to do instead.
# They are real dataclass fields at transformers' defaults (declared at the end of the class), so that a
# transformers script's `HfArgumentParser`, `args.push_to_hub` reads and `TrainingArguments(**hf.to_dict())`
# all work; `validate` refuses any other value with `UnsupportedFieldError`. Supporting one means deleting
# its entry here and implementing it. tests/args/test_training_args.py compares the defaults with installed
# transformers.
_GENERIC_FIX = "leave it at its default"
# fmt: off
HF_ONLY_FIELDS: dict[str, str] = {
    "use_cache": "set model.config.use_cache yourself",
    "project": "name the project in your tracker's own settings",
    "trackio_space_id": "report_to=\"trackio\" logs locally; Spaces are not supported",
    "trackio_bucket_id": "report_to=\"trackio\" logs locally; Spaces are not supported",
    "trackio_static_space_id": "report_to=\"trackio\" logs locally; Spaces are not supported",
}
# fmt: on
UNSUPPORTED_HF_FIELDS: frozenset[str] = frozenset(HF_ONLY_FIELDS)

# Other values that mean "the default", as transformers' own `to_dict()` writes them; accepted and stored
# as the declared default. None today: the fields transformers rewrites there (debug, accelerator_config,
# hub_token) are implemented and read its spellings themselves.
_DEFAULT_SPELLINGS: dict[str, tuple[Any, ...]] = {}

# Names that older transformers releases accepted; difflib alone would point users somewhere odd.
_MOVED_FIELDS: dict[str, str] = {
    "evaluation_strategy": "It was renamed `eval_strategy`",
    "warmup_ratio": "Pass the ratio as `warmup_steps` (a value in [0, 1) is read as a ratio)",
    "no_cuda": "Use `use_cpu=True`",
    "per_gpu_train_batch_size": "Use `per_device_train_batch_size`",
    "per_gpu_eval_batch_size": "Use `per_device_eval_batch_size`",
    "overwrite_output_dir": "Remove it; ember writes into `output_dir` and resumes only when asked",
    "logging_dir": "Remove it (as in transformers 5); for TensorBoard set TENSORBOARD_LOGGING_DIR",
}


class FieldNameError(TypeError, ValueError):
    """A keyword that is not a field. TypeError like any bad keyword; ValueError for config-file callers."""


class UnknownFieldError(FieldNameError):
    """The name is not a field of TrainingArguments (usually a typo)."""


class UnsupportedFieldError(FieldNameError):
    """The name is a transformers TrainingArguments field that ember does not implement yet."""


def _suggest(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


@cache
def _init_field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls) if f.init)


def check_field_names(names: Iterable[str], cls: type | None = None) -> None:
    """Raise `UnsupportedFieldError` / `UnknownFieldError` for the first name that `cls` cannot take."""
    label = "TrainingArguments" if cls is None else cls.__name__
    known = _init_field_names(TrainingFields if cls is None else cls)
    for name in names:
        if name in known:
            continue
        hint = f" {_MOVED_FIELDS[name]}." if name in _MOVED_FIELDS else _suggest(name, known)
        raise UnknownFieldError(f"`{name}` is not a field of {label}.{hint}")


def _is_hf_default(name: str, value: Any, default: Any) -> bool:
    spellings = (default, *_DEFAULT_SPELLINGS.get(name, ()))
    # Compare types too, so 0 does not pass for False nor 1 for True.
    return any(value is s or (type(value) is type(s) and value == s) for s in spellings)


def unsupported_value_error(name: str, value: Any) -> UnsupportedFieldError:
    """The one message for a transformers-only field set away from its default, on every entry path."""
    default = TrainingFields.__dataclass_fields__[name].default
    return UnsupportedFieldError(
        f"`{name}`={value!r}: ember does not implement this transformers TrainingArguments option. "
        f"Leave it at its default ({default!r}) or remove it; instead, {HF_ONLY_FIELDS[name]}."
    )


def check_supported_values(values: Mapping[str, Any], cls: type | None = None) -> None:
    """Raise `UnsupportedFieldError` if a mapping of field values sets a transformers-only field."""
    cls = TrainingFields if cls is None else cls
    for name, value in values.items():
        if _is_inherited_hf_only(cls, name):
            default = TrainingFields.__dataclass_fields__[name].default
            if not _is_hf_default(name, value, default):
                raise unsupported_value_error(name, value)


def _is_inherited_hf_only(cls: type, name: str) -> bool:
    # A subclass that declares the field again implements it, so it is not checked.
    if name not in HF_ONLY_FIELDS or not issubclass(cls, TrainingFields):
        return False
    own = getattr(cls, "__dataclass_fields__", {}).get(name)
    return own is TrainingFields.__dataclass_fields__[name]


def _check_hf_only(args: TrainingFields) -> None:
    for name in HF_ONLY_FIELDS:
        if not _is_inherited_hf_only(type(args), name):
            continue
        value = getattr(args, name)
        default = TrainingFields.__dataclass_fields__[name].default
        if not _is_hf_default(name, value, default):
            raise unsupported_value_error(name, value)
        setattr(args, name, default)
