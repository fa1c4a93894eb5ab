"""`Seq2SeqTrainingArguments`: `TrainingArguments` plus the five fields of transformers' class of that
name (same names, defaults and meanings), read by `Seq2SeqTrainer` (seq2seq.py).

Nothing heavy is imported: transformers is loaded only when a `GenerationConfig` object is checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fields import _f
from .training_args import TrainingArguments

if TYPE_CHECKING:
    from transformers import GenerationConfig

    # What a Python caller may pass. Command-line parsers (HfArgumentParser, ember's ArgParser) read
    # the runtime annotation below, which must stay one they can turn into a flag type: there it is a
    # folder/name (or a JSON object as text); dicts and GenerationConfig objects come from Python or YAML.
    GenerationConfigValue = str | Path | dict[str, Any] | GenerationConfig | None
else:
    GenerationConfigValue = str | Path | None

__all__ = ["Seq2SeqTrainingArguments"]


@dataclass
class Seq2SeqTrainingArguments(TrainingArguments):
    """`TrainingArguments` for sequence-to-sequence models (T5, BART, Marian, Whisper, ...), with the
    generation settings `Seq2SeqTrainer` uses when `predict_with_generate=True`."""

    sortish_sampler: bool = _f(
        False,
        "Train on batches of similar source lengths: the epoch's shuffled order is sorted by length in "
        "chunks of 50 batches and the batches are shuffled again (seeded, resumable). Needs "
        "train_sampling_strategy='random'.",
    )
    predict_with_generate: bool = _f(
        False, "evaluate()/predict() return generated tokens (for ROUGE, BLEU) instead of logits."
    )
    generation_max_length: int | None = _f(
        None, "max_length of generation in evaluation and prediction; unset: the model's generation config."
    )
    generation_num_beams: int | None = _f(
        None, "num_beams of generation in evaluation and prediction; unset: the model's generation config."
    )
    generation_config: GenerationConfigValue = _f(
        None,
        "The GenerationConfig to generate with: a folder (or file) written by GenerationConfig."
        "save_pretrained, a model name, a JSON object of its fields, or (from Python) a dict or a "
        "GenerationConfig.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_seq2seq_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """As `TrainingArguments.to_dict`, with a GenerationConfig as its dict and a path as text."""
        out = super().to_dict()
        value = out.get("generation_config")
        if isinstance(value, Path):
            out["generation_config"] = str(value)
        elif value is not None and not isinstance(value, (str, dict)):
            out["generation_config"] = value.to_dict()
        return out


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a whole number >= 1 or unset (None), got {value!r}.")


def _check_seq2seq_fields(args: Seq2SeqTrainingArguments) -> None:
    for name in ("sortish_sampler", "predict_with_generate"):
        if not isinstance(getattr(args, name), bool):
            raise ValueError(f"`{name}` must be true or false, got {getattr(args, name)!r}.")
    _positive_int_or_none("generation_max_length", args.generation_max_length)
    _positive_int_or_none("generation_num_beams", args.generation_num_beams)
    if args.sortish_sampler and args.train_sampling_strategy != "random":
        raise ValueError(
            f"`sortish_sampler=True` orders the training data itself, so it cannot be combined with "
            f"train_sampling_strategy={args.train_sampling_strategy!r}; leave train_sampling_strategy at "
            "'random' or set sortish_sampler=False."
        )
    args.generation_config = _normalise_generation_config(args.generation_config)


def _normalise_generation_config(value: Any) -> Any:
    """A JSON object given as text (a command-line flag) becomes a dict; other values are checked
    for their kind only: loading a folder or name waits for the Trainer."""
    if isinstance(value, Path) and str(value).lstrip().startswith("{"):
        value = str(value)  # HfArgumentParser makes every flag value of this field a Path
    if value is None or isinstance(value, (Path, dict)):
        return value
    if isinstance(value, str):
        if value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"`generation_config` looks like a JSON object but is not valid JSON ({err}); pass a "
                    "folder, a model name, or a JSON object such as '{\"num_beams\": 4}'."
                ) from None
            if not isinstance(parsed, dict):
                raise ValueError("`generation_config` must be a JSON object of GenerationConfig fields.")
            return parsed
        if not value.strip():
            raise ValueError(
                "`generation_config` is an empty string; leave it unset (None) or name a folder."
            )
        return value
    # By name, so that checking does not import transformers (subclasses count too).
    if any(c.__name__ == "GenerationConfig" for c in type(value).__mro__):
        return value
    raise ValueError(
        f"`generation_config` must be a GenerationConfig, a dict of its fields, or the folder/name to load "
        f"it from; got a {type(value).__name__}."
    )
