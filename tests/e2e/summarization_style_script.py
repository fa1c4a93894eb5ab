"""A summarization script written the way transformers' official examples are (run_summarization.py style).

The drop-in test runs this file twice from the command line: once as it is, on transformers'
Seq2SeqTrainer, and once with only the import line below changed to
`from ember import Seq2SeqTrainer, Seq2SeqTrainingArguments`. Nothing else in it knows about ember.
"""

import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    set_seed,
)
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments  # the one line a user changes
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local model folder."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder if not the model's."}
    )


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "JSON lines with `document` and `summary`."})
    validation_file: str = field(metadata={"help": "Same format, for evaluation."})
    test_file: str | None = field(default=None, metadata={"help": "Same format, for prediction."})
    text_column: str = field(default="document", metadata={"help": "Column of the full texts."})
    summary_column: str = field(default="summary", metadata={"help": "Column of the summaries."})
    max_source_length: int = field(default=32, metadata={"help": "Longer texts are truncated."})
    max_target_length: int = field(default=8, metadata={"help": "Longer summaries are truncated."})
    val_max_target_length: int | None = field(
        default=None,
        metadata={"help": "max_length of generation in evaluate/predict (default: max_target_length)."},
    )
    num_beams: int | None = field(
        default=None, metadata={"help": "num_beams of generation in evaluate/predict."}
    )
    source_prefix: str = field(
        default="", metadata={"help": "Text put before every source (T5's 'summarize: ')."}
    )


def unigram_f1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1 on whitespace tokens (what rouge_score computes without stemming)."""
    pred, ref = Counter(prediction.split()), Counter(reference.split())
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)

    set_seed(training_args.seed)

    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if data_args.test_file:
        data_files["test"] = data_args.test_file
    raw = datasets.load_dataset("json", data_files=data_files)

    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, config=config)

    def preprocess(examples: dict) -> dict:
        inputs = [data_args.source_prefix + doc for doc in examples[data_args.text_column]]
        model_inputs = tokenizer(inputs, max_length=data_args.max_source_length, truncation=True)
        labels = tokenizer(
            text_target=examples[data_args.summary_column],
            max_length=data_args.max_target_length,
            truncation=True,
        )
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    column_names = raw["train"].column_names
    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw = raw.map(
            preprocess, batched=True, remove_columns=column_names, desc="Running tokenizer on dataset"
        )

    data_collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)

    def compute_metrics(eval_preds) -> dict:
        preds, labels = eval_preds
        if isinstance(preds, tuple):
            preds = preds[0]
        preds = np.where(preds != -100, preds, tokenizer.pad_token_id)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        decoded_preds = [s.strip() for s in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        decoded_labels = [s.strip() for s in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        result = {
            "rouge1": round(
                100 * float(np.mean([unigram_f1(p, r) for p, r in zip(decoded_preds, decoded_labels)])), 4
            ),
            "exact_match": round(
                100 * float(np.mean([p == r for p, r in zip(decoded_preds, decoded_labels)])), 4
            ),
        }
        result["gen_len"] = float(np.mean([np.count_nonzero(row != tokenizer.pad_token_id) for row in preds]))
        return result

    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"] if training_args.do_train else None,
        eval_dataset=raw["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(raw["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    max_length = (
        training_args.generation_max_length
        if training_args.generation_max_length is not None
        else data_args.val_max_target_length
    )
    num_beams = data_args.num_beams if data_args.num_beams is not None else training_args.generation_num_beams

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(max_length=max_length, num_beams=num_beams, metric_key_prefix="eval")
        metrics["eval_samples"] = len(raw["validation"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict and "test" in raw:
        logger.info("*** Predict ***")
        results = trainer.predict(
            raw["test"], metric_key_prefix="predict", max_length=max_length, num_beams=num_beams
        )
        metrics = results.metrics
        metrics["predict_samples"] = len(raw["test"])
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero() and training_args.predict_with_generate:
            predictions = np.where(results.predictions != -100, results.predictions, tokenizer.pad_token_id)
            predictions = tokenizer.batch_decode(predictions, skip_special_tokens=True)
            with open(os.path.join(training_args.output_dir, "generated_predictions.txt"), "w") as writer:
                writer.write("\n".join(p.strip() for p in predictions))

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "summarization"}
    trainer.create_model_card(**kwargs)
    with open(os.path.join(training_args.output_dir, "script_done.json"), "w") as f:
        json.dump({"trainer_module": type(trainer).__module__}, f)


if __name__ == "__main__":
    main()
