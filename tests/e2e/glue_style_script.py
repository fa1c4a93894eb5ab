"""A text-classification script written the way transformers' official examples are (run_glue.py style).

The drop-in test runs this file twice from the command line: once as it is, on transformers' Trainer, and
once with only the import line below changed to `from ember import Trainer, TrainingArguments`. Nothing
else in it knows about ember.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)
from transformers import Trainer, TrainingArguments  # the one line a user changes
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
    train_file: str = field(metadata={"help": "CSV or JSON file with `sentence` and `label`."})
    validation_file: str = field(metadata={"help": "Same format, for evaluation."})
    test_file: str | None = field(default=None, metadata={"help": "Same format, for prediction."})
    max_seq_length: int = field(default=64, metadata={"help": "Longer sentences are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    elif len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        model_args, data_args, training_args = parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
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
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)

    set_seed(training_args.seed)

    extension = data_args.train_file.rsplit(".", 1)[-1]
    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if data_args.test_file:
        data_files["test"] = data_args.test_file
    raw = datasets.load_dataset(extension, data_files=data_files)
    label_list = sorted(raw["train"].unique("label"))
    num_labels = len(label_list)

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)

    def preprocess(examples: dict) -> dict:
        return tokenizer(examples["sentence"], truncation=True, max_length=data_args.max_seq_length)

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw = raw.map(preprocess, batched=True, desc="Running tokenizer on dataset")

    train_dataset = raw["train"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    eval_dataset = raw["validation"]
    predict_dataset = raw["test"] if "test" in raw else None

    def compute_metrics(p) -> dict:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.argmax(preds, axis=1)
        return {"accuracy": float((preds == p.label_ids).astype(np.float32).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
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

    if training_args.do_predict and predict_dataset is not None:
        logger.info("*** Predict ***")
        output = trainer.predict(predict_dataset.remove_columns("label"), metric_key_prefix="predict")
        predictions = np.argmax(output.predictions, axis=1)
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "predict_results.txt"), "w") as writer:
                writer.write("index\tprediction\n")
                for index, item in enumerate(predictions):
                    writer.write(f"{index}\t{label_list[item]}\n")

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    with open(os.path.join(training_args.output_dir, "script_done.json"), "w") as f:
        json.dump({"trainer_module": type(trainer).__module__}, f)


if __name__ == "__main__":
    main()
