"""Print, as JSON, the public surface of the installed transformers that ember follows.

usage: python -m tools.surface [--out FILE]

`make compat` runs it in the locked environment and in one with the newest releases, and
`tools.compat` compares the two. What it records: the versions of transformers, peft, accelerate
and datasets; every `TrainingArguments` / `Seq2SeqTrainingArguments` field with its default; the
public members of `Trainer` / `Seq2SeqTrainer` with their parameter names; the fields of
`TrainerState` / `TrainerControl`; the events of `TrainerCallback`. And, for each of those, whether
ember has it (so the report can say which upstream changes ember does not follow yet).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import importlib.metadata
import inspect
import json
from typing import Any


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "<required>"
    if isinstance(value, enum.Enum):
        value = value.value
    return repr(value)


def fields_of(cls: type | None) -> dict[str, str]:
    if cls is None:
        return {}
    return {f.name: _default(f) for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def members_of(cls: type | None) -> dict[str, list[str] | str]:
    """Public members: a callable's parameter names, or the kind of anything else."""
    if cls is None:
        return {}
    out: dict[str, list[str] | str] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        value = inspect.getattr_static(cls, name)
        if isinstance(value, property):
            out[name] = "property"
        elif callable(value) or isinstance(value, (staticmethod, classmethod)):
            func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            try:
                out[name] = [p for p in inspect.signature(func).parameters if p != "self"]
            except (TypeError, ValueError):
                out[name] = "callable"
        else:
            out[name] = "attribute"
    return out


def _get(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def surface(package: str) -> dict[str, Any]:
    """The surface of `package` ("transformers" or "ember") under transformers' names."""
    names = (
        "TrainingArguments",
        "Seq2SeqTrainingArguments",
        "Trainer",
        "Seq2SeqTrainer",
        "TrainerState",
        "TrainerControl",
        "TrainerCallback",
    )
    got = {name: _get(package, name) for name in names}
    return {
        "training_args": fields_of(got["TrainingArguments"]),
        "seq2seq_args": fields_of(got["Seq2SeqTrainingArguments"]),
        "trainer": members_of(got["Trainer"]),
        "seq2seq_trainer": members_of(got["Seq2SeqTrainer"]),
        "state": fields_of(got["TrainerState"]),
        "control": fields_of(got["TrainerControl"]),
        "callback_events": sorted(n for n in dir(got["TrainerCallback"] or object) if n.startswith("on_")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON here instead of printing it")
    opts = parser.parse_args()
    doc = {
        "versions": {p: _version(p) for p in ("transformers", "peft", "accelerate", "datasets", "torch")},
        "transformers": surface("transformers"),
        "ember": surface("ember"),
    }
    text = json.dumps(doc, indent=1, sort_keys=True)
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
