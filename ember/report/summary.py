"""What scripts print and write after a run: the metrics table and a local draft model card.

The formats follow what transformers' scripts produce (`***** train metrics *****` tables,
`README.md` with a results table), so logs and folders look the same after switching; nothing
here talks to a hub.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from .keys import format_value, is_eval_metric

# The Trainer, typed loosely: its script helpers (log_metrics, create_model_card) import this
# module, which must not import it back (not even for types: the import graph of ember/ has no cycle).
Trainer = Any


def _duration(seconds: float) -> str:
    """h:mm:ss.cc, the hundredths truncated (transformers' runtime format)."""
    hundredths = int(abs(seconds - int(seconds)) * 100)
    return f"{datetime.timedelta(seconds=int(seconds))}.{hundredths:02d}"


def metrics_format(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` for reading: runtimes as durations, memory in MB, FLOPs in GF, floats to 4 places."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if "_mem_" in key:
            out[key] = f"{int(value) >> 20}MB"
        elif "_runtime" in key:
            out[key] = _duration(float(value))
        elif key == "total_flos":
            out[key] = f"{int(value) >> 30}GF"
        elif isinstance(value, float):
            out[key] = round(value, 4)
        else:
            out[key] = value
    return out


def metrics_table(split: str, metrics: dict[str, Any]) -> str:
    """The `***** {split} metrics *****` block: sorted keys, names left- and values right-aligned."""
    shown = metrics_format(metrics)
    lines = [f"***** {split} metrics *****"]
    if shown:
        key_width = max(len(str(k)) for k in shown)
        value_width = max(len(str(v)) for v in shown.values())
        lines += [f"  {key:<{key_width}} = {str(shown[key]):>{value_width}}" for key in sorted(shown)]
    return "\n".join(lines)


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _eval_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation during training, with the last training loss logged before it."""
    rows, train_loss = [], "No log"
    for entry in log_history:
        if "loss" in entry:
            train_loss = entry["loss"]
        if "eval_loss" in entry and "train_runtime" not in entry:
            row: dict[str, Any] = {
                "Training Loss": train_loss,
                "Epoch": entry.get("epoch"),
                "Step": entry.get("step"),
                "Validation Loss": entry["eval_loss"],
            }
            for key, value in entry.items():
                if key != "eval_loss" and is_eval_metric(key):
                    row[key.removeprefix("eval_").replace("_", " ").title()] = value
            rows.append(row)
    return rows


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[format_value(row.get(c, ""), decimals=4) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    rule = "|" + "|".join(":" + "-" * w + ":" for w in widths) + "|"
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def _hyperparameters(trainer: Trainer) -> dict[str, Any]:
    args = trainer.args
    world = trainer.strategy.world_size
    params: dict[str, Any] = {
        "learning_rate": args.learning_rate,
        "train_batch_size": args.per_device_train_batch_size,
        "eval_batch_size": args.per_device_eval_batch_size,
        "seed": args.seed,
    }
    if world > 1:
        params["num_devices"] = world
    if args.gradient_accumulation_steps > 1:
        params["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    params["total_train_batch_size"] = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    )
    params["optimizer"] = args.optim
    params["lr_scheduler_type"] = args.lr_scheduler_type
    if args.warmup_steps:
        params["lr_scheduler_warmup_steps"] = args.warmup_steps
    if args.max_steps and args.max_steps > 0:
        params["training_steps"] = args.max_steps
    else:
        params["num_epochs"] = args.num_train_epochs
    precision = trainer.precision.name
    if precision not in ("fp32", "no", ""):
        params["mixed_precision_training"] = precision
    if args.label_smoothing_factor:
        params["label_smoothing_factor"] = args.label_smoothing_factor
    return params


def _front_matter(fields: dict[str, Any]) -> str:
    """YAML metadata; every value is written as JSON, which YAML reads unchanged."""
    lines = ["---"]
    for key, value in fields.items():
        if value in (None, [], ""):
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join([*lines, "---"]) + "\n"


def model_card(
    trainer: Trainer,
    language: str | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
) -> str:
    """The text of a draft model card from the trainer's arguments and `state.log_history`."""
    import torch

    import ember

    config = getattr(trainer.strategy.unwrap(trainer.model_wrapped), "config", None)
    base = finetuned_from or getattr(config, "_name_or_path", None) or None
    if base is not None and Path(str(base)).name == Path(trainer.args.output_dir).name:
        base = None
    name = model_name or Path(trainer.args.output_dir).resolve().name
    datasets = _as_list(dataset)
    rows = _eval_rows(trainer.state.log_history)
    last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)

    parts = [
        _front_matter(
            {
                "library_name": "ember",
                "language": language,
                "license": license,
                "base_model": base,
                "tags": [*_as_list(tags), "generated_from_trainer"],
                "datasets": _as_list(dataset_tags) or datasets,
                "dataset_args": _as_list(dataset_args),
                "tasks": _as_list(tasks),
                "model-index": None,
            }
        ),
        f"\n# {name}\n",
    ]
    source = f"a fine-tuned version of `{base}`" if base else "trained from scratch"
    on = ", ".join(f"the {d}" for d in datasets) + " dataset" + ("s" if len(datasets) > 1 else "")
    parts.append(f"\nThis model is {source} on {on if datasets else 'an unknown dataset'}.\n")
    if last_eval is not None:
        parts.append("\nResults on the evaluation set:\n")
        parts += [
            f"- {key.removeprefix('eval_').replace('_', ' ').title()}: {format_value(value, decimals=4)}\n"
            for key, value in last_eval.items()
            if is_eval_metric(key)
        ]
    parts.append("\n## Training hyperparameters\n\n")
    parts += [f"- {key}: {value}\n" for key, value in _hyperparameters(trainer).items()]
    if rows:
        parts.append("\n## Training results\n\n" + _markdown_table(rows) + "\n")
    parts.append(f"\n## Framework versions\n\n- ember {ember.__version__}\n- PyTorch {torch.__version__}\n")
    return "".join(parts)
