"""`accelerator_config`: the options of transformers' `AcceleratorConfig` that mean something without
accelerate, checked and stored as ember's own `AcceleratorConfig` (read by attribute as scripts read
transformers', written by `to_dict()` as a plain dict as transformers writes it).

What each key does in ember (the data and step code honour them, accelerate is never imported):
- `split_batches`: `per_device_*_batch_size` is the batch of the whole data-parallel group, split over
  its ranks (each takes batch / dp world size, which must divide).
- `even_batches` (True): every rank gets as many batches as the others, the short ones completed by
  wrapping around to the start of the data (the copies are cut from evaluation gathers). False: no
  copies; the last batches are shorter or absent on some ranks.
- `use_seedable_sampler` (True): ember's seeded, resumable order. False: each epoch's shuffle is drawn
  from the global torch RNG, as torch's `RandomSampler` draws it.
- `non_blocking`: host-to-device copies of the batch with `non_blocking=True`.
- `gradient_accumulation_kwargs`: `sync_each_batch` (all-reduce the gradients of every micro-batch
  instead of only the last), `num_steps` (taken as `gradient_accumulation_steps` when that is 1, as
  transformers does), `adjust_scheduler` and `sync_with_dataloader` (accepted: they change nothing in
  transformers' Trainer either, see docs/compatibility.md).
- `dispatch_batches` and `use_configured_state`: accelerate's own machinery; only their defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .distributed import load_json_file

_FIELD = "accelerator_config"


@dataclass
class AcceleratorConfig:
    """ember's reading of transformers' `AcceleratorConfig` (same names, defaults and meanings)."""

    split_batches: bool = False
    dispatch_batches: bool | None = None
    even_batches: bool = True
    use_seedable_sampler: bool = True
    non_blocking: bool = False
    gradient_accumulation_kwargs: dict[str, Any] | None = None

    @property
    def sync_each_batch(self) -> bool:
        return bool((self.gradient_accumulation_kwargs or {}).get("sync_each_batch", False))

    def to_dict(self) -> dict[str, Any]:
        """The keys transformers' `to_dict()` writes for its config (after it drops use_configured_state)."""
        return copy.deepcopy(dataclasses.asdict(self))


_BOOL_KEYS = ("split_batches", "even_batches", "use_seedable_sampler", "non_blocking")
# accelerate's keys that only its own machinery reads: accepted at these values, refused otherwise.
_DEFAULT_ONLY: dict[str, tuple[Any, str]] = {
    "dispatch_batches": (
        None,
        "ember never loads on one process and broadcasts: each rank reads its own share of the data "
        "(iterable datasets included); leave it unset (None) or False",
    ),
    "use_configured_state": (
        False,
        "ember builds no accelerate state (torch.distributed is set up from the launcher's environment); "
        "remove it",
    ),
}
KNOWN_KEYS: tuple[str, ...] = (
    *(f.name for f in dataclasses.fields(AcceleratorConfig)),
    "use_configured_state",
)
GRADIENT_ACCUMULATION_KEYS: tuple[str, ...] = (
    "num_steps",
    "adjust_scheduler",
    "sync_with_dataloader",
    "sync_each_batch",
)


def _suggest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(known)}."


def _from_string(value: Any) -> Any:
    # A command line gives every value as text (transformers converts the same spellings).
    if isinstance(value, str):
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        if value.isdigit():
            return int(value)
    return value


def _mapping(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"`{_FIELD}` is not valid JSON ({err}); pass a dict or a JSON object."
                ) from None
        elif os.path.isfile(text):
            value = load_json_file(_FIELD, text)
        else:
            raise ValueError(
                f"`{_FIELD}`={raw!r} is neither a JSON object nor a file; pass a dict, a JSON object, "
                "or the path of a JSON file."
            )
        if not isinstance(value, dict):
            raise ValueError(f"`{_FIELD}` must hold a JSON object, got {type(value).__name__}.")
        return value
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, type):
        raise ValueError(
            f"`{_FIELD}` is the class {raw.__name__}, not an instance; pass {raw.__name__}() (or a dict)."
        )
    if isinstance(raw, AcceleratorConfig):
        return raw.to_dict()
    # transformers' or accelerate's config object, read by its attributes (accelerate not imported).
    if any(hasattr(raw, key) for key in ("split_batches", "even_batches", "use_seedable_sampler")):
        return {key: getattr(raw, key) for key in KNOWN_KEYS if hasattr(raw, key)}
    raise ValueError(
        f"`{_FIELD}` must be a dict, a JSON object or file, or an AcceleratorConfig; "
        f"got {type(raw).__name__}."
    )


def _gradient_accumulation(value: Any, gradient_accumulation_steps: int) -> dict[str, Any] | None:
    name = f"{_FIELD}['gradient_accumulation_kwargs']"
    if value is None:
        return None
    if isinstance(value, str) and value.strip().startswith("{"):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"`{name}` must be a dict like {{'sync_each_batch': True}}, got {value!r}.")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key not in GRADIENT_ACCUMULATION_KEYS:
            raise ValueError(
                f"`{name}` has an unknown key {key!r}.{_suggest(key, GRADIENT_ACCUMULATION_KEYS)}"
            )
        item = _from_string(item)
        if key == "num_steps":
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ValueError(f"`{name}['num_steps']` must be a whole number >= 1, got {item!r}.")
            # transformers takes num_steps as the accumulation only when gradient_accumulation_steps is
            # left at 1, and refuses both; the same value twice (a to_dict round trip) is not a conflict.
            if gradient_accumulation_steps > 1 and item != gradient_accumulation_steps:
                raise ValueError(
                    f"`{name}['num_steps']`={item} and `gradient_accumulation_steps`="
                    f"{gradient_accumulation_steps} both set the accumulation; set "
                    "gradient_accumulation_steps only (remove num_steps)."
                )
        elif not isinstance(item, bool):
            raise ValueError(f"`{name}['{key}']` must be True or False, got {item!r}.")
        out[key] = item
    return out


def normalise_accelerator_config(raw: Any, gradient_accumulation_steps: int) -> AcceleratorConfig:
    """`raw` (None, a dict, a JSON object or file, an AcceleratorConfig) as a checked config.

    Raises ValueError naming the key and the fix for an unknown key, a wrong type, or a value ember
    does not run."""
    if raw is None:
        return AcceleratorConfig()
    config = _mapping(raw)
    values: dict[str, Any] = {}
    for key, value in config.items():
        if key not in KNOWN_KEYS:
            raise ValueError(f"`{_FIELD}` has an unknown key {key!r}.{_suggest(key, KNOWN_KEYS)}")
        value = _from_string(value)
        if key in _DEFAULT_ONLY:
            default, why = _DEFAULT_ONLY[key]
            if not (value is default or (key == "dispatch_batches" and value is False)):
                raise ValueError(f"`{_FIELD}['{key}']`={value!r} is not supported by ember: {why}.")
            continue
        if key in _BOOL_KEYS and not isinstance(value, bool):
            raise ValueError(f"`{_FIELD}['{key}']` must be True or False, got {value!r}.")
        if key == "gradient_accumulation_kwargs":
            value = _gradient_accumulation(value, gradient_accumulation_steps)
        values[key] = value
    return AcceleratorConfig(**values)


def accelerator_config_of(args: Any) -> AcceleratorConfig:
    """The checked config of `args` (arguments that never ran validation give the defaults)."""
    config = getattr(args, "accelerator_config", None)
    return config if isinstance(config, AcceleratorConfig) else AcceleratorConfig()


def rank_batch_size(batch_size: int, args: Any, dp_world_size: int) -> int:
    """What one rank loads of `batch_size`: all of it, or with `split_batches` its share of it."""
    if dp_world_size <= 1 or not accelerator_config_of(args).split_batches:
        return batch_size
    return batch_size // dp_world_size


def check_split_batches(args: Any, dp_world_size: int) -> None:
    """With `split_batches`, each per-device batch size must divide over the data-parallel ranks."""
    if dp_world_size <= 1 or not accelerator_config_of(args).split_batches:
        return
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        size = int(getattr(args, name))
        if size % dp_world_size:
            raise ValueError(
                f"`{_FIELD}['split_batches']`=True splits `{name}`={size} over {dp_world_size} data-parallel "
                f"ranks, which does not divide; set {name} to a multiple of {dp_world_size} (e.g. "
                f"{max(dp_world_size, size - size % dp_world_size)}) or split_batches=False."
            )
