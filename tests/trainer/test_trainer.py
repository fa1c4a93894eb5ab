"""Trainer behaviour on tiny models: reproducibility, step arithmetic, exact GA, eval and predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ember import EvalPrediction, Trainer, TrainingArguments
from tests.helpers import (
    RegressionDataset,
    RegressionModel,
    lm_examples,
    max_param_diff,
    pad_lm_batch,
    params_of,
    tiny_gpt2,
)


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=0.05,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=4,
        optim="adamw_torch",
        use_cpu=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _train_regression(tmp_path, seed: int, **kw) -> dict[str, torch.Tensor]:
    args = _args(tmp_path, seed=seed, **kw)
    trainer = Trainer(
        model_init=lambda: RegressionModel(dropout=0.1), args=args, train_dataset=RegressionDataset()
    )
    trainer.train()
    return params_of(trainer.model)


def test_same_seed_reproduces_and_other_seed_differs(tmp_path):
    a = _train_regression(tmp_path / "a", seed=1)
    b = _train_regression(tmp_path / "b", seed=1)
    c = _train_regression(tmp_path / "c", seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_three_epochs_of_64_at_batch_8_is_24_steps(tmp_path):
    trainer = Trainer(
        RegressionModel(), _args(tmp_path, num_train_epochs=3), train_dataset=RegressionDataset(64)
    )
    out = trainer.train()
    assert out.global_step == 24
    assert trainer.state.max_steps == 24
    assert trainer.state.epoch == pytest.approx(3.0)
    assert np.isfinite(out.training_loss)


def test_max_steps_overrides_epochs_and_loss_decreases(tmp_path):
    trainer = Trainer(
        RegressionModel(),
        _args(tmp_path, max_steps=40, logging_steps=10),
        train_dataset=RegressionDataset(64),
    )
    out = trainer.train()
    assert out.global_step == 40
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all("grad_norm" in h and "learning_rate" in h for h in trainer.state.log_history if "loss" in h)


def test_iterable_dataset_needs_max_steps_and_runs_with_it(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            ds = RegressionDataset(24)
            return (ds[i] for i in range(len(ds)))

    with pytest.raises(ValueError, match="max_steps"):
        Trainer(RegressionModel(), _args(tmp_path), train_dataset=Stream()).train()
    trainer = Trainer(RegressionModel(), _args(tmp_path, max_steps=7), train_dataset=Stream())
    assert trainer.train().global_step == 7


def _ga_run(tmp_path, batch: int, ga: int, data: list, seed: int = 0) -> dict[str, torch.Tensor]:
    args = _args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        weight_decay=0.0,
    )
    trainer = Trainer(tiny_gpt2(seed), args, train_dataset=data, data_collator=pad_lm_batch)
    trainer.train()
    return params_of(trainer.model)


def test_gradient_accumulation_is_exact_for_padded_causal_lm(tmp_path):
    data = lm_examples(16, seed=3)
    full = _ga_run(tmp_path / "a", 8, 1, data)
    accumulated = _ga_run(tmp_path / "b", 2, 4, data)

    # The reference: a plain PyTorch step on the whole batch of 8 with the model's own loss.
    model = tiny_gpt2(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for start in (0, 8):
        batch = pad_lm_batch(data[start : start + 8])
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    reference = params_of(model)
    assert max_param_diff(full, reference) < 1e-6
    assert max_param_diff(accumulated, reference) < 1e-6
    # And the check is not vacuous: training moved the weights.
    assert max_param_diff(reference, params_of(tiny_gpt2(0))) > 1e-3


def test_naive_token_count_would_differ(tmp_path):
    """Counting `labels != -100` (without the causal shift) gives a different update: the shift matters."""
    from ember.engine import loss as loss_mod

    data = lm_examples(8, seed=5)
    exact = _ga_run(tmp_path / "a", 2, 4, data)
    original = loss_mod.shifts_labels
    try:
        loss_mod.shifts_labels = lambda model: False  # type: ignore[assignment]
        import ember.trainer.trainer as trainer_mod

        trainer_mod.shifts_labels = loss_mod.shifts_labels
        wrong = _ga_run(tmp_path / "b", 2, 4, data)
    finally:
        loss_mod.shifts_labels = original
        trainer_mod.shifts_labels = original
    assert max_param_diff(exact, wrong) > 1e-6


def test_model_without_loss_gives_clear_error(tmp_path):
    class NoLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

        def forward(self, input_x, labels=None):
            return {"logits": self.lin(input_x.unsqueeze(-1))}

    trainer = Trainer(NoLoss(), _args(tmp_path, max_steps=1), train_dataset=RegressionDataset(8))
    with pytest.raises(ValueError, match="returned no loss.*label_names"):
        trainer.train()


def test_compute_loss_override_without_num_items_is_averaged_over_micro_batches(tmp_path):
    seen = []

    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False):
            loss = model(**inputs)[0]
            seen.append(float(loss.detach()))
            return loss

    trainer = MyTrainer(
        RegressionModel(),
        _args(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            logging_steps=1,
        ),
        train_dataset=RegressionDataset(16),
    )
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged[0] == pytest.approx((seen[0] + seen[1]) / 2, rel=1e-6)


def _accuracy(pred: EvalPrediction) -> dict[str, float]:
    preds, labels = pred
    return {"mae": float(np.abs(preds - labels).mean())}


def test_evaluate_dict_of_datasets_prefixes_names(tmp_path):
    trainer = Trainer(
        RegressionModel(),
        _args(tmp_path),
        compute_metrics=_accuracy,
        eval_dataset={"a": RegressionDataset(10, seed=1), "b": RegressionDataset(13, seed=2)},
    )
    metrics = trainer.evaluate()
    for name in ("a", "b"):
        assert {f"eval_{name}_loss", f"eval_{name}_mae", f"eval_{name}_runtime"} <= set(metrics)
    assert metrics["eval_a_loss"] != metrics["eval_b_loss"]


def test_eval_loss_and_metric_match_a_manual_computation(tmp_path):
    ds = RegressionDataset(21, seed=4)
    model = RegressionModel()
    trainer = Trainer(model, _args(tmp_path, per_device_eval_batch_size=8), compute_metrics=_accuracy)
    metrics = trainer.evaluate(ds)
    with torch.no_grad():
        pred = model(ds.x)[0]
    assert metrics["eval_mae"] == pytest.approx(float((pred - ds.y).abs().mean()), rel=1e-5)
    # transformers weights each batch's mean loss by its size: on equal-weight MSE that is the plain mean.
    assert metrics["eval_loss"] == pytest.approx(float(((pred - ds.y) ** 2).mean()), rel=1e-5)


def test_batch_eval_metrics_streams_and_matches_full_eval(tmp_path):
    calls = []

    class StreamingMAE:
        def __init__(self):
            self.total, self.count = 0.0, 0

        def __call__(self, pred: EvalPrediction, compute_result: bool = False):
            calls.append((pred.predictions.shape[0], compute_result))
            self.total += float(np.abs(pred.predictions - pred.label_ids).sum())
            self.count += pred.predictions.shape[0]
            if compute_result:
                out = {"mae": self.total / self.count}
                self.total, self.count = 0.0, 0
                return out
            return {}

    ds = RegressionDataset(21, seed=4)
    model = RegressionModel()
    full = Trainer(model, _args(tmp_path, per_device_eval_batch_size=8), compute_metrics=_accuracy).evaluate(
        ds
    )
    streaming = Trainer(
        model,
        _args(tmp_path, per_device_eval_batch_size=8, batch_eval_metrics=True),
        compute_metrics=StreamingMAE(),
    ).evaluate(ds)
    assert calls == [(8, False), (8, False), (5, True)]
    assert streaming["eval_mae"] == pytest.approx(full["eval_mae"], rel=1e-6)


def test_predict_pads_variable_lengths_with_minus_100(tmp_path):
    model = tiny_gpt2(0)
    data = lm_examples(6, seed=7, min_len=3, max_len=12)
    args = _args(tmp_path, per_device_eval_batch_size=4)
    out = Trainer(model, args, data_collator=pad_lm_batch).predict(data)
    longest = max(len(d["input_ids"]) for d in data)
    logits = out.predictions
    assert logits.shape[:2] == (6, longest) and logits.shape[2] == 97
    assert out.label_ids.shape == (6, longest)
    for row, d in zip(out.label_ids, data):
        assert row[: len(d["labels"])].tolist() == d["labels"]
        assert (row[len(d["labels"]) :] == -100).all()
    assert "test_loss" in out.metrics and "test_runtime" in out.metrics


def test_prediction_loss_only_returns_no_logits(tmp_path):
    out = Trainer(RegressionModel(), _args(tmp_path, prediction_loss_only=True)).predict(RegressionDataset(9))
    assert out.predictions is None and "test_loss" in out.metrics


def test_user_optimizer_and_scheduler_win(tmp_path):
    model = RegressionModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = Trainer(
        model, _args(tmp_path, max_steps=3), train_dataset=RegressionDataset(), optimizers=(opt, sched)
    )
    trainer.train()
    assert trainer.optimizer is opt and trainer.lr_scheduler is sched
    assert opt.param_groups[0]["lr"] == 0.01


def test_label_smoothing_matches_its_formula_with_the_causal_shift(tmp_path):
    data = lm_examples(8, seed=2)
    model = tiny_gpt2(0)
    eps = 0.1
    smooth = Trainer(model, _args(tmp_path, label_smoothing_factor=eps), data_collator=pad_lm_batch).evaluate(
        data
    )
    batch = pad_lm_batch(data)
    with torch.no_grad():
        logp = torch.log_softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1
        )
    logp, labels = logp[:, :-1], batch["labels"][:, 1:]
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (((1 - eps) * nll - eps * logp.mean(-1)) * mask).sum() / mask.sum()
    assert smooth["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_eval_strategy_without_eval_dataset_is_a_clear_error_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="eval_strategy"):
        Trainer(
            RegressionModel(),
            _args(tmp_path, eval_strategy="steps", eval_steps=2),
            train_dataset=RegressionDataset(),
        )
    assert not (tmp_path / "checkpoint-2").exists()


def test_optimizers_and_optimizer_cls_together_is_an_error(tmp_path):
    model = RegressionModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        Trainer(
            model,
            _args(tmp_path),
            optimizers=(opt, None),
            optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
        )


def test_optimizer_cls_and_kwargs_is_used(tmp_path):
    trainer = Trainer(
        RegressionModel(),
        _args(tmp_path, max_steps=2),
        train_dataset=RegressionDataset(),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.02, "momentum": 0.5}),
    )
    trainer.train()
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.5


def test_overrides_of_mixed_in_members_are_what_train_calls(tmp_path):
    """evaluate, prediction_step, log and floating_point_ops live in mixins; train() reaches a subclass's."""
    calls: list[str] = []

    class MyTrainer(Trainer):
        def evaluate(self, *args, **kwargs):
            calls.append("evaluate")
            return super().evaluate(*args, **kwargs)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            calls.append("prediction_step")
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

        def log(self, logs, start_time=None):
            calls.append("log")
            super().log(logs, start_time)

        def floating_point_ops(self, inputs):
            return 1000

    trainer = MyTrainer(
        RegressionModel(),
        _args(tmp_path, max_steps=2, logging_steps=1, eval_strategy="steps", eval_steps=2),
        train_dataset=RegressionDataset(32),
        eval_dataset=RegressionDataset(8, seed=1),
    )
    trainer.train()
    assert {"evaluate", "prediction_step", "log"} <= set(calls)
    assert trainer.state.total_flos == 2 * 1000  # two steps of one micro-batch each


def test_a_batch_with_shift_labels_gives_the_loss_of_its_labels(tmp_path):
    # transformers' models accept targets already shifted (`shift_labels`); context parallelism
    # makes them. The loss and its target count must be those of the same targets given as labels.
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=lm_examples(4))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 6:] = -100
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    plain = trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    given = trainer.compute_loss(model, {"input_ids": ids, "labels": labels, "shift_labels": shifted})
    assert float(given) == pytest.approx(float(plain), abs=1e-6)
    # A step with both micro-batches divided by the whole step's count adds up the same way.
    total = torch.tensor(int((shifted != -100).sum()) * 2)
    half = trainer.compute_loss(model, {"input_ids": ids, "shift_labels": shifted}, num_items_in_batch=total)
    assert float(half) * 2 == pytest.approx(float(plain), abs=1e-6)
