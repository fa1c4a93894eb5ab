"""The runtime fields of transformers' TrainingArguments that ember implements: memory metrics,
torch_empty_cache_steps, average_tokens_across_devices, save_on_each_node, enable_jit_checkpoint,
and label smoothing on multi-label models (turned off, as transformers)."""

from __future__ import annotations

import os
import signal
import time
import warnings

import pytest
import torch

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.callbacks import empty_cache
from ember.engine.preemption import TrainingPreempted
from tests.helpers import RegressionDataset, RegressionModel


def _args(out, **kw) -> TrainingArguments:
    base: dict = dict(
        output_dir=str(out),
        max_steps=5,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(out, **kw) -> Trainer:
    return Trainer(
        RegressionModel(),
        _args(out, **kw),
        train_dataset=RegressionDataset(),
        eval_dataset=RegressionDataset(16),
    )


class HoldMemory(TrainerCallback):
    """Holds ~200 MB for a moment at step 2, then frees it: a peak the metrics must see."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            block = torch.ones(50_000_000)  # 200 MB, touched
            time.sleep(0.1)  # several samples of the 2 ms sampler
            del block


def test_memory_metrics_follow_transformers_names_and_see_the_peak(tmp_path):
    trainer = _trainer(tmp_path, skip_memory_metrics=False)
    trainer.add_callback(HoldMemory())
    metrics = trainer.train().metrics
    assert {"train_mem_cpu_alloc_delta", "train_mem_cpu_peaked_delta"} <= set(metrics)
    assert metrics["train_mem_cpu_peaked_delta"] > 150 * 2**20
    assert all(isinstance(metrics[k], int) for k in metrics if "_mem_" in k)
    assert {"eval_mem_cpu_alloc_delta", "eval_mem_cpu_peaked_delta"} <= set(trainer.evaluate())
    assert "test_mem_cpu_alloc_delta" in trainer.predict(RegressionDataset(8)).metrics
    quiet = _trainer(tmp_path / "quiet")
    assert not any("_mem_" in k for k in quiet.train().metrics)


def test_evaluation_during_training_is_not_tracked_separately(tmp_path):
    trainer = _trainer(tmp_path, skip_memory_metrics=False, eval_strategy="steps", eval_steps=2)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and not any("eval_mem_cpu_alloc_delta" in h for h in evals)
    assert "eval_mem_cpu_alloc_delta" in trainer.evaluate()  # on its own it is


def test_empty_cache_every_n_steps(tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(empty_cache, "empty_device_cache", lambda: calls.append(trainer.state.global_step))
    trainer = _trainer(tmp_path, torch_empty_cache_steps=2)
    trainer.train()
    assert calls == [2, 4]
    with pytest.raises(ValueError, match="torch_empty_cache_steps"):
        _args(tmp_path, torch_empty_cache_steps=0)


def test_average_tokens_and_save_on_each_node_where_they_mean_something(tmp_path, monkeypatch):
    assert _args(tmp_path, average_tokens_across_devices=False).average_tokens_across_devices is False
    one_node = _args(tmp_path, save_on_each_node=True)
    assert one_node.save_on_each_node and one_node.should_save
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="average_tokens_across_devices=False"):
        _args(tmp_path, average_tokens_across_devices=False)
    with pytest.raises(ValueError, match="save_on_each_node=True.*several nodes"):
        _args(tmp_path, save_on_each_node=True)


def test_ddp_static_graph_with_accumulation_is_refused(tmp_path):
    assert _args(tmp_path, ddp_static_graph=True).ddp_static_graph is True  # tests/strategy runs it
    with pytest.raises(ValueError, match="ddp_static_graph=True.*gradient_accumulation_steps"):
        _args(tmp_path, ddp_static_graph=True, gradient_accumulation_steps=2)


def test_enable_jit_checkpoint_saves_and_exits_on_sigterm(tmp_path):
    class Term(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = _trainer(tmp_path, enable_jit_checkpoint=True, max_steps=10)
    trainer.add_callback(Term())
    with pytest.raises(TrainingPreempted):
        trainer.train()
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()


def test_label_smoothing_is_turned_off_for_multi_label_models(tmp_path, caplog):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    def model():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3)
        config.problem_type, config.pad_token_id = "multi_label_classification", 0
        return GPT2ForSequenceClassification(config)

    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(1, 50, (6,), generator=g),
            "labels": torch.randint(0, 2, (3,), generator=g).float(),
        }
        for _ in range(16)
    ]
    losses = []
    for smoothing in (0.0, 0.2):
        # A UserWarning, as transformers gives it.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer(
                model(), _args(tmp_path, max_steps=3, label_smoothing_factor=smoothing), train_dataset=rows
            )
        assert any("multi-label" in str(w.message) for w in caught) == (smoothing > 0)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == losses[1]
