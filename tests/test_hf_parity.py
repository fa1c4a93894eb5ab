"""Drop-in fidelity: the same tiny model and data through transformers' Trainer and ember's give the
same numbers, files and printed tables (offline; transformers runs for real, nothing is mocked)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ember
from tests.helpers import RegressionDataset, RegressionModel, lm_examples, pad_lm_batch, tiny_gpt2

transformers = pytest.importorskip("transformers")

COMMON: dict[str, Any] = dict(
    report_to="none", disable_tqdm=True, use_cpu=True, optim="adamw_torch", save_strategy="no"
)
# Keys whose values are wall-clock measurements: the only ones two identical runs may differ in.
SPEED = ("_runtime", "_per_second")


def _pair(
    tmp_path: Path, model_fn: Any, train: Any = None, eval_: Any = None, trainer_kw: Any = None, **kw: Any
) -> tuple[Any, Any]:
    """(transformers Trainer, ember Trainer) over the same model init, data and arguments."""
    out = []
    for name, lib in (("hf", transformers), ("ember", ember)):
        args = lib.TrainingArguments(output_dir=str(tmp_path / name), **{**COMMON, **kw})
        torch.manual_seed(0)
        out.append(
            lib.Trainer(
                model=model_fn(), args=args, train_dataset=train, eval_dataset=eval_, **(trainer_kw or {})
            )
        )
    return out[0], out[1]


def _batch_encoding_collator(features: list[dict[str, list[int]]]) -> Any:
    return transformers.BatchEncoding(pad_lm_batch(features))


def tiny_tagger() -> nn.Module:
    """A 2-layer BERT token classifier, as run_ner trains (its loss is a plain per-token mean)."""
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForTokenClassification(config)


def tagging_examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(1, 97, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [i % 5 for i in ids]})
    return out


def _steps(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in history if key in h]


# -- 2. silent wrong numbers -----------------------------------------------------------------------


def test_eval_loss_with_a_batch_encoding_collator_matches_transformers(tmp_path):
    # 10 samples at batch 4: the last batch has 2, so an unweighted mean of batch means differs.
    data = tagging_examples(10, seed=3)
    hf, em = _pair(
        tmp_path,
        tiny_tagger,
        eval_=data,
        per_device_eval_batch_size=4,
        trainer_kw={"data_collator": _batch_encoding_collator},
    )
    want, got = hf.evaluate(), em.evaluate()
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    # 10 samples, not 3 "batches of one".
    assert got["eval_samples_per_second"] == pytest.approx(10 / got["eval_runtime"], rel=0.1)


def test_batch_encoding_batches_train_like_plain_dicts(tmp_path):
    losses = []
    for name, collate in (("dict", pad_lm_batch), ("enc", _batch_encoding_collator)):
        args = ember.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=3, logging_steps=1, **COMMON
        )
        trainer = ember.Trainer(tiny_gpt2(), args, train_dataset=lm_examples(16), data_collator=collate)
        trainer.train()
        losses.append(_steps(trainer.state.log_history, "loss"))
    assert losses[0] == losses[1]


def test_logged_learning_rate_is_the_one_the_step_used(tmp_path):
    hf, em = _pair(
        tmp_path,
        RegressionModel,
        train=RegressionDataset(64),
        max_steps=20,
        logging_steps=5,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
    )
    hf.train()
    em.train()
    want, got = _steps(hf.state.log_history, "learning_rate"), _steps(em.state.log_history, "learning_rate")
    assert [s for s, _ in got] == [5, 10, 15, 20]
    assert [lr for _, lr in got] == pytest.approx([lr for _, lr in want], rel=1e-9)
    assert got[-1][1] > 0  # the last step still used a nonzero rate
    assert em.get_learning_rates() == pytest.approx(hf.get_learning_rates())


def test_total_flos_matches_transformers(tmp_path):
    # Equal lengths, so the padded batch shapes do not depend on the data order of either library.
    data = lm_examples(16, min_len=12, max_len=12)
    hf, em = _pair(
        tmp_path,
        tiny_gpt2,
        train=data,
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=4,
        trainer_kw={"data_collator": pad_lm_batch},
    )
    hf.train()
    got = em.train().metrics["total_flos"]
    # (transformers' progress printer pops total_flos out of its own train metrics; the state keeps it)
    assert hf.state.total_flos > 0 and got == em.state.total_flos == hf.state.total_flos
    batch = pad_lm_batch(data[:4])
    assert em.floating_point_ops(batch) == hf.floating_point_ops(batch)


class NanAtSteps(nn.Module):
    """Each training forward returns the next scripted loss (nan included), independent of the data."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.script, self.calls = script, 0

    def forward(self, input_x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        value = self.script[self.calls % len(self.script)] if self.training else 0.0
        self.calls += int(self.training)
        loss = self.w.sum() * 0.0 + torch.tensor(value)
        return (loss, input_x)


def test_nan_inf_filter_logs_what_transformers_logs(tmp_path):
    nan = math.nan
    script = [1.0, 2.0, nan, nan, 4.0, nan, math.inf, 3.0]
    hf, em = _pair(
        tmp_path,
        lambda: NanAtSteps(script),
        train=RegressionDataset(64),
        max_steps=8,
        logging_steps=2,
        per_device_train_batch_size=8,
        logging_nan_inf_filter=True,
    )
    want, got = hf.train(), em.train()
    expected = _steps(hf.state.log_history, "loss")
    assert _steps(em.state.log_history, "loss") == [(s, pytest.approx(v)) for s, v in expected]
    assert all(math.isfinite(v) for _, v in _steps(em.state.log_history, "loss"))
    assert got.training_loss == pytest.approx(want.training_loss) and math.isfinite(got.training_loss)


# -- 3. / 4. evaluation outputs ----------------------------------------------------------------------


def test_bf16_on_cpu_evaluates_and_predicts_in_float32(tmp_path):
    args = ember.TrainingArguments(
        output_dir=str(tmp_path), bf16=True, max_steps=2, per_device_train_batch_size=4, **COMMON
    )
    seen = []

    def metrics(pred):
        seen.append(pred.predictions.dtype)
        return {"n": float(pred.predictions.shape[0])}

    data = lm_examples(8)
    trainer = ember.Trainer(
        tiny_gpt2(),
        args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=pad_lm_batch,
        compute_metrics=metrics,
    )
    trainer.train()
    assert trainer.evaluate()["eval_n"] == 8.0
    assert seen == [np.float32]
    assert trainer.predict(data).predictions.dtype == np.float32


class Regression(RegressionModel):
    main_input_name = "input_x"  # what transformers hands as `inputs` with include_for_metrics


def test_batch_eval_metrics_receive_tensors_as_in_transformers(tmp_path):
    seen: dict[str, list[Any]] = {"hf": [], "ember": []}

    def make_metric(name: str) -> Any:
        state = {"sum": torch.zeros(()), "n": 0}

        def compute(pred: Any, compute_result: bool) -> dict[str, float]:
            seen[name].append(
                (type(pred.predictions), type(pred.label_ids), type(pred.inputs), compute_result)
            )
            # torch-only code: raises on numpy arrays.
            state["sum"] += torch.abs(pred.predictions.detach() - pred.label_ids).sum()
            state["n"] += pred.label_ids.numel()
            if not compute_result:
                return {}
            result = {"mae": float(state["sum"] / state["n"])}
            state["sum"], state["n"] = torch.zeros(()), 0
            return result

        return compute

    data = RegressionDataset(10)
    results = []
    for name, lib in (("hf", transformers), ("ember", ember)):
        args = lib.TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_eval_batch_size=4,
            batch_eval_metrics=True,
            include_for_metrics=["inputs"],
            **COMMON,
        )
        torch.manual_seed(0)
        trainer = lib.Trainer(Regression(), args, eval_dataset=data, compute_metrics=make_metric(name))
        results.append(trainer.evaluate())
    assert seen["ember"] == seen["hf"]
    assert seen["ember"][0][:2] == (torch.Tensor, torch.Tensor)
    assert results[1]["eval_mae"] == pytest.approx(results[0]["eval_mae"], rel=1e-6)


# -- 6. the history is reproducible --------------------------------------------------------------------


class StopAt(ember.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _history_run(out: Path, resume: Any = None, stop: int | None = None, **kw: Any) -> ember.Trainer:
    args = ember.TrainingArguments(
        output_dir=str(out),
        **{
            **COMMON,
            "max_steps": 12,
            "save_strategy": "steps",
            "save_steps": 4,
            "logging_steps": 2,
            "eval_strategy": "steps",
            "eval_steps": 4,
            "gradient_accumulation_steps": 2,
            "per_device_train_batch_size": 4,
            **kw,
        },
    )
    data = lm_examples(48, min_len=12, max_len=12)
    trainer = ember.Trainer(
        tiny_gpt2(),
        args,
        train_dataset=data,
        eval_dataset=data[:8],
        data_collator=pad_lm_batch,
        callbacks=[StopAt(stop)] if stop else None,
    )
    if stop:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    else:
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def _without_speed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if not k.endswith(SPEED)} for h in history]


def test_log_history_is_identical_across_runs_and_after_resume(tmp_path):
    a = _history_run(tmp_path / "a").state.log_history
    b = _history_run(tmp_path / "b").state.log_history
    _history_run(tmp_path / "c", stop=4)
    c = _history_run(tmp_path / "c", resume=str(tmp_path / "c" / "checkpoint-4")).state.log_history
    # Only the final train entry and the eval entries carry wall-clock figures.
    for h in (*a[:-1], *b[:-1], *c[:-1]):
        if "loss" in h:
            assert not any(k.endswith(SPEED) or k == "mfu" for k in h), h
    assert _without_speed(a) == _without_speed(b) == _without_speed(c)
    assert a[-1]["total_flos"] > 0
    saved = json.loads((tmp_path / "c" / "checkpoint-12" / "trainer_state.json").read_text())
    assert saved["total_flos"] == a[-1]["total_flos"]


# -- 8. changed intervals on resume ------------------------------------------------------------------


def test_resume_keeps_the_checkpoints_intervals_and_warns(tmp_path, caplog):
    def hf_run(**kw: Any) -> Any:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "hf"),
            **{**COMMON, "save_strategy": "steps", "max_steps": 12, "per_device_train_batch_size": 8, **kw},
        )
        torch.manual_seed(0)
        return transformers.Trainer(RegressionModel(), args, train_dataset=RegressionDataset(64))

    hf_run(max_steps=4, save_steps=4, logging_steps=2).train()
    hf = hf_run(save_steps=5, logging_steps=3)
    hf.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-4"))

    def em_run(**kw: Any) -> Any:
        args = ember.TrainingArguments(
            output_dir=str(tmp_path / "em"),
            **{**COMMON, "save_strategy": "steps", "max_steps": 12, "per_device_train_batch_size": 8, **kw},
        )
        return ember.Trainer(RegressionModel(), args, train_dataset=RegressionDataset(64))

    em_run(max_steps=4, save_steps=4, logging_steps=2).train()
    em = em_run(save_steps=5, logging_steps=3)
    with caplog.at_level(logging.WARNING):
        em.train(resume_from_checkpoint=str(tmp_path / "em" / "checkpoint-4"))
    assert "logging_steps: 3 (from args) != 2 (from trainer_state.json)" in caplog.text
    assert "save_steps: 5 (from args) != 4 (from trainer_state.json)" in caplog.text
    assert "eval_steps" not in caplog.text or "eval_steps is" in caplog.text
    assert [s for s, _ in _steps(em.state.log_history, "loss")] == [
        s for s, _ in _steps(hf.state.log_history, "loss")
    ]
    hf_ckpts = sorted(p.name for p in (tmp_path / "hf").iterdir() if p.name.startswith("checkpoint-"))
    em_ckpts = sorted(p.name for p in (tmp_path / "em").iterdir() if p.name.startswith("checkpoint-"))
    assert em_ckpts == hf_ckpts


# -- 9. rotation with the best model -----------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_save_total_limit_with_best_model_keeps_what_transformers_keeps(tmp_path, limit):
    def metric() -> Any:
        calls = {"n": 0}

        def compute(pred: Any) -> dict[str, float]:
            calls["n"] += 1  # best at the first evaluation, then worse
            return {"score": 10.0 if calls["n"] == 1 else float(calls["n"])}

        return compute

    left = []
    for name, lib in (("hf", transformers), ("ember", ember)):
        out = tmp_path / name
        args = lib.TrainingArguments(
            output_dir=str(out),
            **{
                **COMMON,
                "max_steps": 10,
                "save_strategy": "steps",
                "save_steps": 2,
                "eval_strategy": "steps",
                "eval_steps": 2,
                "save_total_limit": limit,
                "metric_for_best_model": "score",
                "greater_is_better": True,
                "load_best_model_at_end": True,
                "per_device_train_batch_size": 8,
            },
        )
        torch.manual_seed(0)
        lib.Trainer(
            RegressionModel(),
            args,
            train_dataset=RegressionDataset(),
            eval_dataset=RegressionDataset(8),
            compute_metrics=metric(),
        ).train()
        left.append(sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")))
    assert left[1] == left[0]
    expected = {1: [2], 2: [2, 10], 3: [2, 8, 10]}[limit]  # 1: only the best once training ends
    assert left[1] == sorted(f"checkpoint-{s}" for s in expected)


# -- 1. the members scripts call ---------------------------------------------------------------------

METRICS = {
    "train_runtime": 75.3456,
    "train_samples_per_second": 12.345678,
    "train_loss": 1.23456789,
    "total_flos": 3.5e12,
    "epoch": 3.0,
    "train_steps": 100,
}


def test_log_metrics_prints_the_same_table_and_save_metrics_the_same_files(tmp_path):
    hf, em = _pair(tmp_path, RegressionModel)
    # transformers' Trainer.metrics_format is an unbound helper (calling it on an instance raises),
    # so compare with the module function it wraps.
    from transformers.trainer_pt_utils import metrics_format

    assert em.metrics_format(METRICS) == metrics_format(METRICS)
    printed = []
    for trainer in (hf, em):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            trainer.log_metrics("train", METRICS)
        printed.append(buf.getvalue())
    assert printed[1] == printed[0] and "***** train metrics *****" in printed[1]

    for trainer in (hf, em):
        Path(trainer.args.output_dir).mkdir(parents=True, exist_ok=True)
        trainer.save_metrics("train", METRICS)
        trainer.save_metrics("eval", {"eval_loss": 0.5, "epoch": 3.0})
        trainer.save_metrics("test", {"test_loss": 0.25}, combined=False)
    for name in ("train_results.json", "eval_results.json", "test_results.json", "all_results.json"):
        want = json.loads((tmp_path / "hf" / name).read_text())
        assert json.loads((tmp_path / "ember" / name).read_text()) == want, name
    assert "test_loss" not in json.loads((tmp_path / "ember" / "all_results.json").read_text())


def test_save_state_and_process_zero_flags(tmp_path):
    args = ember.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, logging_steps=1, per_device_train_batch_size=8, **COMMON
    )
    trainer = ember.Trainer(RegressionModel(), args, train_dataset=RegressionDataset())
    trainer.train()
    assert trainer.is_world_process_zero() and trainer.is_local_process_zero()
    trainer.save_state()
    saved = json.loads((tmp_path / "trainer_state.json").read_text())
    assert saved["global_step"] == 2 and saved["log_history"] == trainer.state.log_history


def test_counting_members_match_transformers(tmp_path):
    data = lm_examples(10, min_len=12, max_len=12)
    hf, em = _pair(tmp_path, tiny_gpt2, train=data, max_steps=1, trainer_kw={"data_collator": pad_lm_batch})
    hf.train()
    em.train()
    assert em.get_num_trainable_parameters() == hf.get_num_trainable_parameters()
    assert em.num_examples(em.get_train_dataloader()) == hf.num_examples(hf.get_train_dataloader()) == 10
    groups_em, groups_hf = em.get_optimizer_group(), hf.get_optimizer_group()
    assert [len(g) for g in groups_em] == [len(g) for g in groups_hf]
    param = next(em.model.parameters())
    assert any(p is param for p in em.get_optimizer_group(param)["params"])
    assert em.num_tokens(em.get_train_dataloader()) == 10 * 12
    assert em.num_tokens(em.get_train_dataloader(), max_steps=1) == 8 * 12
    fresh = ember.Trainer(
        RegressionModel(), ember.TrainingArguments(output_dir=str(tmp_path / "f"), **COMMON)
    )
    with pytest.raises(ValueError, match="no optimizer"):
        fresh.get_learning_rates()


def test_create_model_card_writes_a_local_readme(tmp_path):
    args = ember.TrainingArguments(
        output_dir=str(tmp_path / "my-model"),
        max_steps=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        **COMMON,
    )
    trainer = ember.Trainer(
        RegressionModel(), args, train_dataset=RegressionDataset(), eval_dataset=RegressionDataset(8)
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny-regressor", dataset="toy-lines", license="mit", tags="demo")
    card = (tmp_path / "my-model" / "README.md").read_text()
    assert "# tiny-regressor" in card and "the toy-lines dataset" in card
    assert 'license: "mit"' in card and '- "demo"' in card
    assert "- learning_rate: 0.003" in card and "- train_batch_size: 8" in card
    table = [line for line in card.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "Training Loss" and "Validation Loss" in table[0]
    assert len(table) == 2 + 2  # header, rule, evaluations at steps 2 and 4
    assert "Runtime" not in card


class EvalLossScript(nn.Module):
    """Each eval forward returns the next scripted loss: nan batches test eval_loss's filter."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.script, self.calls = script, 0

    def forward(self, input_x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        value = self.script[self.calls % len(self.script)]
        self.calls += 1
        return (self.w.sum() * 0.0 + torch.tensor(value), input_x)


@pytest.mark.parametrize("script", [[1.0, math.nan, 3.0], [math.nan, math.inf, math.nan]])
def test_eval_loss_skips_non_finite_batches_as_transformers(tmp_path, script):
    hf, em = _pair(
        tmp_path, lambda: EvalLossScript(script), eval_=RegressionDataset(10), per_device_eval_batch_size=4
    )
    want, got = hf.evaluate()["eval_loss"], em.evaluate()["eval_loss"]
    if math.isfinite(want):
        assert got == pytest.approx(want)
    else:
        assert not math.isfinite(got)


# `make compat` runs these against the newest transformers, peft, accelerate and datasets.
pytestmark = pytest.mark.dropin
