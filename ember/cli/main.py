"""The `ember` command: `ember train CONFIG.yaml [--FIELD VALUE ...]` and `ember report RUN_DIR`.

The job file's sections are described in `JOB_HELP` (printed by `ember train --help`).

transformers is imported inside the functions that need it, so `import ember.cli` stays light.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.args.parser import ArgParser, ConfigError, args_from_dict, parse_config
from ember.args.training_args import TrainingArguments, check_field_names
from ember.callbacks import TrainerCallback
from ember.cli.textdata import (
    DATA_BUILDERS,
    JobConfigError,
    TextSplits,
    as_mapping,
    build_texts,
    build_tokenizer,
    check_keys,
    chunk_texts,
    did_you_mean,
    existing_path,
)
from ember.report.keys import format_value, is_eval_metric, is_number

if TYPE_CHECKING:
    pass

__all__ = ["DATA_BUILDERS", "MODEL_TYPES", "JobConfigError", "TextSplits", "load_job", "main", "run_job"]

SECTIONS = ("model", "tokenizer", "data", "args", "generate", "torch_threads")
# type name -> (config class, model class), both importable from transformers.
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "gpt2": ("transformers.GPT2Config", "transformers.GPT2LMHeadModel"),
    "llama": ("transformers.LlamaConfig", "transformers.LlamaForCausalLM"),
}
_GENERATE_KEYS = ("prompt", "max_new_tokens", "top_k", "temperature", "seed")
JOB_HELP = """\
A job file has these top-level sections (relative paths are relative to the current directory,
as `output_dir` is):

    model:      {type: gpt2, config: {n_layer: 4, ...}}                      a registered type
                {from_config: transformers.GPT2Config, class: transformers.GPT2LMHeadModel, config: {...}}
                {pretrained: PATH, auto_class: AutoModelForCausalLM}          a local folder
    tokenizer:  {train: byte_level_bpe, vocab_size: 2048, min_frequency: 2, cache_dir: DIR}
                {pretrained: PATH}          (omit it to use the pretrained model's folder)
    data:       {shakespeare: {eval_plays: [...], block_size: 128, ...}}      one named builder
                {text_files: {paths: [...], eval_paths: [...], eval_fraction: 0.1}}
    args:       TrainingArguments fields; `--FIELD VALUE` flags override them
    generate:   {prompt: "...", max_new_tokens: 60, top_k: 20, seed: 0}      or false
    torch_threads: 2
"""
_USAGE = "usage: ember {train,report} ...\n"
_HELP = (
    _USAGE
    + """
  ember train CONFIG.yaml [--FIELD VALUE ...]   train, evaluate, save and sample (--help: every field)
  ember report RUN_DIR [RUN_DIR ...] [--out DIR]   summarise and plot runs (logs.jsonl) into report.html
"""
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ember` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_HELP, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "--version":
        from ember import __version__

        print(f"ember {__version__}")
        return 0
    try:
        if command == "train":
            return _train_command(rest)
        if command == "report":
            return _report_command(rest)
    except ConfigError as err:
        print(f"ember {command}: error: {err}", file=sys.stderr)
        return 2
    print(f"{_USAGE}ember: error: unknown command {command!r}; use `train` or `report`.", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------------------
# ember train


def _train_parser() -> ArgParser[TrainingArguments]:
    parser: ArgParser[TrainingArguments] = ArgParser(
        TrainingArguments,
        prog="ember train",
        usage="ember train CONFIG.yaml [--FIELD VALUE ...]",
        description=JOB_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job_file", metavar="CONFIG.yaml", help="the job file (sections above).")
    return parser


def _train_command(argv: list[str]) -> int:
    try:
        values = _train_parser().parse_into_dict(argv)
        job_file = values.pop("job_file")
        job = load_job(job_file)
        job_args = job.get("args") or {}
        if not isinstance(job_args, Mapping):
            raise JobConfigError(f"{job_file}: `args` must map TrainingArguments fields to values.")
        try:
            check_field_names(job_args)
        except ValueError as err:
            raise JobConfigError(f"{job_file}: args: {err}") from None
        args = args_from_dict({**job_args, **values})
    except ConfigError:
        raise
    except ValueError as err:  # TrainingArguments validation, naming the field
        raise ConfigError(str(err)) from None
    run_job(job, args)
    return 0


def load_job(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a job file and check its sections, so a typo fails before anything is built."""
    job = parse_config(path)
    for key in job:
        if key not in SECTIONS:
            raise JobConfigError(f"{path}: unknown section `{key}`.{did_you_mean(key, SECTIONS)}")
    for key in ("model", "data"):
        if not job.get(key):
            raise JobConfigError(f"{path}: the `{key}` section is required (see `ember train --help`).")
    return job


def run_job(job: Mapping[str, Any], args: TrainingArguments) -> dict[str, Any]:
    """Build tokenizer, data and model from `job`, train, evaluate, save, and sample some text."""
    import torch

    from ember.trainer.trainer import Trainer
    from ember.utils import count_parameters, set_seed

    if job.get("torch_threads"):
        torch.set_num_threads(int(job["torch_threads"]))
    model_spec, generate = _section(job, "model"), job.get("generate", {})
    make_model = model_builder(model_spec)
    if generate is not False:
        check_keys(as_mapping(generate, "generate"), _GENERATE_KEYS, "generate")
    splits = build_texts(job["data"])
    tokenizer = build_tokenizer(job.get("tokenizer"), model_spec, splits.train)
    set_seed(args.seed)  # the model's initial weights depend on it
    model = make_model(tokenizer)
    block_size = _block_size(splits.block_size, model)
    train_set, eval_set = (chunk_texts(t, tokenizer, block_size) for t in (splits.train, splits.eval))
    if _context_length(model) and tokenizer.model_max_length > _context_length(model):
        tokenizer.model_max_length = _context_length(model)  # saved with it: warns on overlong inputs
    print(
        f"ember: {count_parameters(model) / 1e6:.2f}M parameters, vocab {len(tokenizer)}, "
        f"{len(train_set)} train / {len(eval_set)} eval blocks of {block_size} tokens",
        flush=True,
    )
    from ember.data import default_data_collator

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[_PerplexityPrinter()],
    )
    result: dict[str, Any] = {"train": trainer.train().metrics}
    metrics = _final_eval(trainer)
    result["eval"], result["perplexity"] = metrics, _perplexity(metrics.get("eval_loss"))
    trainer.save_model()
    if trainer.state.is_world_process_zero:  # one report and sample, however many processes train
        _print_results(result, block_size, args.output_dir)
        if generate is not False:
            result["sample"] = generate_text(trainer.model, tokenizer, as_mapping(generate, "generate"))
            print(f"sample:\n{result['sample']}", flush=True)
    return result


def _print_results(result: dict[str, Any], block_size: int, output_dir: str) -> None:
    train, loss = result["train"], result["eval"].get("eval_loss", float("nan"))
    print(f"\neval loss {loss:.4f}, perplexity {result['perplexity']:.2f}")
    rate = train.get("train_samples_per_second")
    if rate:
        print(
            f"throughput {rate * block_size:,.0f} tokens/s over train_runtime {train['train_runtime']:.1f} s "
            "(evaluations included)"
        )
    print(f"saved model and tokenizer to {output_dir}")


def _final_eval(trainer: Any) -> dict[str, Any]:
    """The eval metrics at the last step: those logged if the trainer just evaluated, else new ones."""
    step = trainer.state.global_step
    for record in reversed(trainer.state.log_history):
        if record.get("step") != step:
            break
        if "eval_loss" in record:
            return dict(record)
    return dict(trainer.evaluate())


def _section(job: Mapping[str, Any], name: str) -> dict[str, Any]:
    return as_mapping(job.get(name), name)


class _PerplexityPrinter(TrainerCallback):
    """Prints exp(eval_loss) after each evaluation (the trainer logs only the loss)."""

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and metrics and "eval_loss" in metrics:
            from tqdm.auto import tqdm

            ppl = _perplexity(metrics["eval_loss"])
            tqdm.write(
                f"step {state.global_step}: eval loss {metrics['eval_loss']:.4f}, perplexity {ppl:.2f}"
            )


def _perplexity(loss: Any) -> float:
    try:
        return math.exp(min(float(loss), 700.0))
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------------------
# Model


def _import_object(dotted: str, where: str) -> Any:
    module_name, sep, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not sep or not module_name or not attr:
        raise JobConfigError(
            f"{where}: {dotted!r} is not an importable name such as transformers.GPT2Config."
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise JobConfigError(f"{where}: cannot import {dotted!r} ({err}).") from None


def build_model(spec: Mapping[str, Any], tokenizer: Any) -> Any:
    """A model from the `model:` section (see `JOB_HELP`)."""
    return model_builder(spec)(tokenizer)


def model_builder(spec: Mapping[str, Any]) -> Callable[[Any], Any]:
    """Check the `model:` section now, so a typo fails before data and tokenizer are built; the
    returned function builds the model once the tokenizer (vocabulary size) is known."""
    check_keys(spec, ("type", "from_config", "class", "config", "pretrained", "auto_class"), "model")
    given = [k for k in ("type", "from_config", "pretrained") if k in spec]
    if len(given) != 1:
        raise JobConfigError("model: give exactly one of `type`, `from_config` or `pretrained`.")
    if "pretrained" in spec:
        import transformers

        auto_name = str(spec.get("auto_class", "AutoModelForCausalLM"))
        auto = getattr(transformers, auto_name, None)
        if auto is None or not auto_name.startswith("Auto"):
            raise JobConfigError(f"model: `auto_class` {auto_name!r} is not a transformers Auto* class.")
        path = existing_path(spec["pretrained"], "model: pretrained")
        return lambda tokenizer: auto.from_pretrained(path)
    if "type" in spec:
        if spec["type"] not in MODEL_TYPES:
            raise JobConfigError(
                f"model: unknown type {spec['type']!r}.{did_you_mean(str(spec['type']), list(MODEL_TYPES))} "
                "Or use `from_config` and `class` with importable names."
            )
        config_name, class_name = MODEL_TYPES[spec["type"]]
    else:
        config_name, class_name = spec["from_config"], spec.get("class", "transformers.AutoModelForCausalLM")
    config_cls = _import_object(config_name, "model: from_config")
    model_cls = _import_object(class_name, "model: class")
    values = as_mapping(spec.get("config"), "model.config")
    _check_config_keys(config_cls, values)

    def build(tokenizer: Any) -> Any:
        config = config_cls(**_with_tokenizer_values(values, tokenizer))
        model = model_cls.from_config(config) if model_cls.__name__.startswith("Auto") else model_cls(config)
        if getattr(model, "loss_type", "") is None:
            # transformers picks a model's loss by its class name, and GPT2LMHeadModel's names none, so
            # its loss warns on every run; an `ember train` job is a causal LM, which says which.
            model.loss_type = "ForCausalLM"
        return model

    return build


def _check_config_keys(config_cls: type, values: Mapping[str, Any]) -> None:
    # transformers configs keep unknown keys silently: `n_layers: 2` would leave 12 layers.
    known = set(inspect.signature(config_cls).parameters) | set(vars(config_cls()))
    known |= set(getattr(config_cls, "attribute_map", {}))
    for key in values:
        if key not in known or key.startswith("_"):
            raise JobConfigError(
                f"model.config: `{key}` is not a field of {config_cls.__name__}."
                f"{did_you_mean(key, sorted(k for k in known if not k.startswith('_')))}"
            )


def _with_tokenizer_values(values: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """`values` with the vocabulary size and special token ids taken from the tokenizer where unset."""
    values = dict(values)
    vocab = len(tokenizer)
    if values.setdefault("vocab_size", vocab) < vocab:
        raise JobConfigError(
            f"model.config: vocab_size {values['vocab_size']} is smaller than the tokenizer's {vocab}; "
            "remove it to use the tokenizer's size."
        )
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            values.setdefault(f"{name}_token_id", token_id)
    return values


def _context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _block_size(requested: int | None, model: Any) -> int:
    context = _context_length(model)
    if requested is None:
        if context is None:
            raise JobConfigError("data: set `block_size`; the model config names no context length.")
        return min(context, 1024)
    if context is not None and requested > context:
        raise JobConfigError(f"data: block_size {requested} exceeds the model's context length {context}.")
    return int(requested)


# ---------------------------------------------------------------------------------------------------------
# Sampling


def generate_text(model: Any, tokenizer: Any, spec: Mapping[str, Any]) -> str:
    """A short continuation of `prompt` (top-k sampling with a fixed seed; top_k: 0 for greedy)."""
    import torch

    check_keys(spec, _GENERATE_KEYS, "generate")
    prompt = str(spec.get("prompt", "\n"))
    top_k = int(spec.get("top_k", 20))
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    room = (_context_length(model) or 10**9) - inputs["input_ids"].shape[1]
    torch.manual_seed(int(spec.get("seed", 0)))
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max(1, min(int(spec.get("max_new_tokens", 60)), room)),
            do_sample=top_k > 0,
            top_k=top_k if top_k > 0 else None,
            temperature=float(spec.get("temperature", 1.0)) if top_k > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0], skip_special_tokens=True))


# ---------------------------------------------------------------------------------------------------------
# ember report


def _report_command(argv: list[str]) -> int:
    from ember.report.plots import RunLog, default_out_dir, find_runs, run_names, write_report

    parser = argparse.ArgumentParser(
        prog="ember report",
        description="Summarise runs from their logs.jsonl; plot them (overlaid) into one HTML page.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="+", help="an output_dir, its logs.jsonl, or a folder of runs"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where the PNGs and report.html go (default: RUN_DIR/report; "
        "for several runs, `report` in the folder that holds them)",
    )
    parser.add_argument("--no-plots", action="store_true", help="print the text summary only")
    ns = parser.parse_args(argv)
    logs = find_runs(ns.run_dir)
    runs = []
    for log, name in zip(logs, run_names(logs)):
        summary = format_report(read_logs(log), str(log))
        print(f"== {name}\n{summary}\n" if len(logs) > 1 else summary, flush=True)
        runs.append(RunLog(name, read_logs(log), summary))
    if ns.no_plots:
        return 0
    out = Path(ns.out) if ns.out else default_out_dir(logs)
    written = write_report(runs, out)
    print(f"\nwrote {len(written) - 1} plots and {out / 'report.html'}")
    return 0


def read_logs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of the last run in a logs.jsonl (a run that starts again at a lower step begins
    a new one, e.g. the same output_dir reused), or the `log_history` of a trainer_state.json."""
    if Path(path).suffix == ".json":
        return _state_log_history(path)
    runs: list[list[dict[str, Any]]] = [[]]
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{number}: not a JSON line.") from None
        if runs[-1] and record.get("step", 0) < runs[-1][-1].get("step", 0):
            runs.append([])
        runs[-1].append(record)
    return runs[-1]


def _state_log_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON ({err}).") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ConfigError(f"{path} has no log_history list; is it a trainer_state.json?")
    return [record for record in history if isinstance(record, dict)]


def format_report(records: list[dict[str, Any]], source: str = "") -> str:
    """A two-column table: steps, train loss (first/last/min), eval metrics, throughput."""
    rows: list[tuple[str, str]] = [("log", source)] if source else []
    rows.append(("records", str(len(records))))
    if records:
        last = records[-1]
        rows += [("steps", format_value(last.get("step"))), ("epochs", format_value(last.get("epoch")))]
        rows += _loss_rows(records)
        summary: dict[str, Any] = next((r for r in reversed(records) if "train_runtime" in r), {})
        for key in ("train_loss", "train_runtime", "num_input_tokens_seen"):
            if key in summary or key in last:
                rows.append((key, format_value(summary.get(key, last.get(key)))))
        rows += [(k, format_value(v)) for k, v in summary.items() if k.endswith("_per_second") or k == "mfu"]
        step_logs = [r for r in records if "loss" in r]
        for key in ("tokens_per_second", "mfu"):
            values = [float(r[key]) for r in step_logs if isinstance(r.get(key), (int, float))]
            if values and key not in summary:
                rows.append((f"{key} (mean of logs)", format_value(sum(values) / len(values))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _loss_rows(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    losses = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    if losses:
        low = min(losses, key=lambda pair: pair[1])
        rows.append(
            ("train loss first / last", f"{format_value(losses[0][1])} / {format_value(losses[-1][1])}")
        )
        rows.append(("train loss min", f"{format_value(low[1])} at step {low[0]}"))
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if evals:
        best = min(evals, key=lambda r: float(r["eval_loss"]))
        rows.append(("eval loss last", f"{format_value(evals[-1]['eval_loss'])} at step {evals[-1]['step']}"))
        rows.append(("eval loss min", f"{format_value(best['eval_loss'])} at step {best['step']}"))
        rows.append(("eval perplexity last", format_value(_perplexity(evals[-1]["eval_loss"]))))
    last_eval: dict[str, Any] = next(
        (r for r in reversed(records) if any(k.startswith("eval_") for k in r)), {}
    )
    for key, value in last_eval.items():
        if key != "eval_loss" and is_eval_metric(key) and is_number(value):
            rows.append((key, format_value(value)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
