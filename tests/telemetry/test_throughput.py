"""Throughput figures in the logs, and MFU when FLOPs per token and the device peak are known."""

from __future__ import annotations

import time

import pytest
import torch

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.telemetry.throughput import Throughput, model_flops_per_token
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2


def test_rates_follow_counts_and_time():
    tp = Throughput(flops_per_token=600.0, peak_flops=1e6, world_size=1)
    tp.add(
        [
            {"input_ids": torch.zeros(4, 10, dtype=torch.long)},
            {"input_ids": torch.zeros(2, 5, dtype=torch.long)},
        ]
    )
    tp.since = time.perf_counter() - 2.0
    rates = tp.rates(lambda t: t)
    assert rates["tokens_per_second"] == pytest.approx(25.0, rel=0.01)
    assert rates["samples_per_second"] == pytest.approx(3.0, rel=0.01)
    assert rates["mfu"] == pytest.approx(25.0 * 600.0 / 1e6, rel=0.01)
    assert tp.tokens == 0 and tp.samples == 0  # reset for the next window


def test_real_tokens_exclude_padding_and_mfu_counts_only_model_work():
    tp = Throughput(flops_per_token=600.0, peak_flops=1e6, world_size=1, label_shift=True)
    padded = pad_lm_batch(
        [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    )
    tp.add([padded])  # 8 positions, 6 real inputs, 3 + 1 targets after the shift
    tp.since = time.perf_counter() - 1.0
    rates = tp.rates(lambda t: t)
    assert rates["tokens_per_second"] == pytest.approx(8.0, rel=0.01)
    assert rates["real_tokens_per_second"] == pytest.approx(4.0, rel=0.01)
    assert rates["mfu"] == pytest.approx(6.0 * 600.0 / 1e6, rel=0.01)


def test_packed_rows_count_their_examples():
    from ember.data import PackingCollator

    tp = Throughput(flops_per_token=None, peak_flops=None, world_size=1, label_shift=True)
    examples = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7]}]
    tp.add([PackingCollator(max_length=5)(examples)])  # rows [1 2 3 4 5] and [6 7 pad pad pad]
    tp.since = time.perf_counter() - 1.0
    rates = tp.rates(lambda t: t)
    assert rates["samples_per_second"] == pytest.approx(3.0, rel=0.01)
    assert rates["tokens_per_second"] == pytest.approx(10.0, rel=0.01)
    assert rates["real_tokens_per_second"] == pytest.approx(4.0, rel=0.01)


def test_flops_per_token_of_a_transformers_model_is_six_n_without_embeddings():
    model = tiny_gpt2()
    assert model_flops_per_token(model) == 6.0 * model.num_parameters(exclude_embeddings=True)


def test_trainer_logs_throughput_and_mfu_to_callbacks_but_not_to_the_history(tmp_path):
    class Seen(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        device_peak_flops=1e12,
    )
    seen = Seen()
    trainer = Trainer(
        tiny_gpt2(), args, train_dataset=lm_examples(16), data_collator=pad_lm_batch, callbacks=[seen]
    )
    trainer.train()
    logs = [h for h in seen.logs if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["tokens_per_second"] > 0 and h["samples_per_second"] > 0
        assert 0 < h["mfu"] < 1
        assert 0 < h["real_tokens_per_second"] < h["tokens_per_second"]  # padded batches
    # The history keeps what two identical runs agree on: no wall-clock figures in step entries.
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    assert not any(
        k in h
        for h in steps
        for k in ("tokens_per_second", "real_tokens_per_second", "samples_per_second", "mfu")
    )
