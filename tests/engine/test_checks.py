"""Bad arguments and bad inputs are refused before the work starts, with the field and the fix."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ember import Trainer, TrainingArguments
from tests.helpers import RegressionDataset, RegressionModel, lm_examples, pad_lm_batch, tiny_gpt2


def _args(tmp_path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _regression(tmp_path, train: Any = None, eval_dataset: Any = None, **kw: Any) -> Trainer:
    return Trainer(
        model=RegressionModel(),
        args=_args(tmp_path, **kw),
        train_dataset=RegressionDataset(16) if train is None else train,
        eval_dataset=RegressionDataset(8, seed=1) if eval_dataset is None else eval_dataset,
    )


# -- arguments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("learning_rate", math.nan, "NaN"),
        ("max_grad_norm", math.nan, "NaN"),
        ("learning_rate", math.inf, "infinite"),
        ("num_train_epochs", math.inf, "infinite"),
        ("num_train_epochs", math.nan, "NaN"),
    ],
)
def test_nan_and_infinite_arguments_are_refused(tmp_path, field, value, words):
    with pytest.raises(ValueError, match=f"`{field}`.*{words}"):
        _args(tmp_path, **{field: value})


def test_an_empty_output_dir_or_a_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`output_dir` is empty"):
        _args(tmp_path, output_dir="")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="`output_dir`=.*is a file"):
        _args(tmp_path, output_dir=str(afile))


def test_output_dir_writability_is_checked_with_access(tmp_path, monkeypatch):
    # Root ignores permission bits; the check asks os.access, so make it say no.
    from ember.engine import checks

    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="choose a folder you can write to"):
        checks.check_output_dir_writable(str(tmp_path / "run"))


def test_zero_steps_are_refused(tmp_path):
    trainer = _regression(tmp_path, max_steps=0, num_train_epochs=0)
    with pytest.raises(ValueError, match="0 steps.*set max_steps > 0 or num_train_epochs > 0"):
        trainer.train()


def test_warmup_longer_than_the_run_warns_with_both_numbers(tmp_path, caplog):
    trainer = _regression(tmp_path, max_steps=3, warmup_steps=10)
    with caplog.at_level(logging.WARNING, logger="ember"):
        trainer.train()
    assert "warmup lasts 10 steps but the run has only 3" in caplog.text


# -- datasets and batches --------------------------------------------------------------------------


def test_an_empty_training_set_is_named_not_drop_last(tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` is empty") as err:
        _regression(tmp_path, train=[]).train()
    assert "drop_last" not in str(err.value)


@pytest.mark.parametrize("item", [None, "some raw text"])
def test_items_that_are_not_feature_dicts_are_refused(tmp_path, item):
    with pytest.raises(TypeError, match=r"`train_dataset`\[0\] is .*Tokenize raw text first"):
        _regression(tmp_path, train=[item, item]).train()


def _lm_trainer(tmp_path, examples: list[dict[str, list[int]]], vocab: int = 97, **kw: Any) -> Trainer:
    return Trainer(
        model=tiny_gpt2(vocab=vocab),
        args=_args(tmp_path, per_device_train_batch_size=2, max_steps=1, **kw),
        train_dataset=examples,
        data_collator=pad_lm_batch,
    )


def test_token_ids_past_the_embedding_are_refused_before_the_first_step(tmp_path):
    examples = lm_examples(4, vocab=120, seed=3)  # ids up to 119, the model has 97 rows
    trainer = _lm_trainer(tmp_path, examples, vocab=97)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(
        ValueError, match="input_ids range from .* embedding has 97 rows.*resize_token_embeddings"
    ):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_lm_labels_of_another_shape_than_the_input_are_refused(tmp_path):
    def short_labels(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_lm_batch(features)
        batch["labels"] = batch["labels"][:, :-1]
        return batch

    trainer = Trainer(
        model=tiny_gpt2(),
        args=_args(tmp_path, per_device_train_batch_size=2, max_steps=1),
        train_dataset=lm_examples(4),
        data_collator=short_labels,
    )
    with pytest.raises(ValueError, match="one label per token"):
        trainer.train()


def test_class_labels_past_num_labels_are_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    data = [{"input_ids": [1, 2, 3], "labels": label} for label in (0, 1, 2, 5)]

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor([f["input_ids"] for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    trainer = Trainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=4, max_steps=1),
        train_dataset=data,
        data_collator=collate,
    )
    with pytest.raises(ValueError, match="labels go up to 5, but the model has num_labels=3"):
        trainer.train()


class PerSampleLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, input_x: torch.Tensor, labels: torch.Tensor) -> Any:
        pred = self.lin(input_x.unsqueeze(-1)).squeeze(-1)
        return {"loss": (pred - labels) ** 2, "logits": pred}  # one loss per sample


def test_a_non_scalar_loss_is_refused(tmp_path):
    trainer = Trainer(
        model=PerSampleLoss(), args=_args(tmp_path, max_steps=1), train_dataset=RegressionDataset(8)
    )
    with pytest.raises(ValueError, match=r"loss has shape \(8,\).*loss.mean\(\)"):
        trainer.train()


def test_an_empty_eval_dataset_is_an_error(tmp_path):
    trainer = _regression(tmp_path, eval_dataset=[])
    with pytest.raises(ValueError, match="`eval_dataset` is empty"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="`eval_dataset` is empty"):
        trainer.evaluate(eval_dataset=[])


# -- metrics -----------------------------------------------------------------------------------------


def _with_metrics(tmp_path, metrics_fn: Any, **kw: Any) -> Trainer:
    return Trainer(
        model=RegressionModel(),
        args=_args(tmp_path, **kw),
        train_dataset=RegressionDataset(16),
        eval_dataset=RegressionDataset(8, seed=1),
        compute_metrics=metrics_fn,
    )


def test_compute_metrics_must_return_a_dict(tmp_path):
    with pytest.raises(TypeError, match="compute_metrics returned a list"):
        _with_metrics(tmp_path, lambda p: [0.5]).evaluate()


def test_an_array_metric_is_refused_naming_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(8,\) for 'err'.*reduce it"):
        _with_metrics(tmp_path, lambda p: {"err": np.abs(p.predictions - p.label_ids)}).evaluate()
    # A 0-d array or a numpy scalar is one number and fine.
    metrics = _with_metrics(tmp_path, lambda p: {"err": np.array(1.5)}).evaluate()
    assert metrics["eval_err"] == 1.5


def test_a_string_best_metric_is_refused(tmp_path):
    trainer = _with_metrics(
        tmp_path,
        lambda p: {"grade": "good"},
        eval_strategy="steps",
        eval_steps=1,
        max_steps=1,
        metric_for_best_model="grade",
    )
    with pytest.raises(TypeError, match="metric_for_best_model `eval_grade` is 'good'"):
        trainer.train()


def test_a_best_metric_missing_at_the_first_evaluation_names_the_available_ones(tmp_path):
    trainer = _with_metrics(
        tmp_path,
        lambda p: {"mse": 1.0},
        eval_strategy="steps",
        eval_steps=1,
        max_steps=1,
        metric_for_best_model="accuracy",
    )
    with pytest.raises(KeyError, match="eval_accuracy.*eval_loss.*eval_mse"):
        trainer.train()


def test_a_nan_metric_never_becomes_the_best(tmp_path):
    values = iter([math.nan, 2.0, 3.0])
    trainer = _with_metrics(
        tmp_path,
        lambda p: {"score": next(values)},
        eval_strategy="steps",
        eval_steps=1,
        max_steps=3,
        metric_for_best_model="score",
        greater_is_better=False,
    )
    trainer.train()
    assert trainer.state.best_metric == 2.0
    assert trainer.state.best_global_step == 2


# -- resume --------------------------------------------------------------------------------------------


def test_resuming_past_max_steps_is_refused(tmp_path):
    first = _regression(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    first.train()
    shorter = _regression(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="at step 4, past this run's max_steps=2"):
        shorter.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))


def test_trainer_needs_a_model_and_one_way_to_choose_the_optimizer(tmp_path):
    with pytest.raises(ValueError, match="`model` or `model_init`"):
        Trainer(args=_args(tmp_path), train_dataset=RegressionDataset(8))
    model = RegressionModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="either `optimizers` or `optimizer_cls_and_kwargs`"):
        Trainer(
            model,
            _args(tmp_path),
            train_dataset=RegressionDataset(8),
            optimizers=(optimizer, None),
            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
        )


# -- every batch, and everything knowable at train() start (issue 22) ---------------------------------


def test_a_token_id_past_the_embedding_in_a_later_batch_names_the_batch_the_id_and_the_vocab(tmp_path):
    # Batches 0-4 are fine; micro-batch 1 of step 3 (the epoch's 6th) holds id 150 in a 97-row table.
    calls = [0]

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_lm_batch(features)
        if calls[0] == 5:
            batch["input_ids"][1, 0] = 150
        calls[0] += 1
        return batch

    trainer = _lm_trainer(tmp_path, lm_examples(12, vocab=97, seed=3), gradient_accumulation_steps=2)
    trainer.data_collator = collate
    trainer.args.max_steps = 3
    with pytest.raises(ValueError) as err:
        trainer.train()
    text = str(err.value)
    assert "micro-batch 1 of step 3 (epoch 0, micro-batch 5 of the epoch)" in text
    assert "token id 150" in text and "97 rows" in text
    assert trainer.state.global_step == 2  # stopped before the step, not deep inside the embedding


def test_a_negative_token_id_in_a_later_batch_is_refused(tmp_path):
    calls = [0]

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_lm_batch(features)
        if calls[0] == 2:
            batch["input_ids"][0, 0] = -7
        calls[0] += 1
        return batch

    trainer = _lm_trainer(tmp_path, lm_examples(6, vocab=97, seed=3))
    trainer.data_collator = collate
    trainer.args.max_steps = 3
    with pytest.raises(ValueError, match="micro-batch 0 of step 3 .*token id -7"):
        trainer.train()


@pytest.mark.parametrize("eval_dataset", [[], {"good": RegressionDataset(4), "empty": []}])
def test_an_empty_eval_set_is_refused_at_train_start_before_any_step(tmp_path, eval_dataset):
    trainer = _regression(tmp_path, eval_dataset=eval_dataset, eval_strategy="steps", eval_steps=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"eval_dataset.* is empty.*eval_strategy='steps'.*before any step"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
