"""A tiny training run with evaluation, shared by the tracker tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ember import EvalPrediction, Trainer, TrainingArguments
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2


def _next_token_accuracy(pred: EvalPrediction) -> dict[str, float]:
    preds, labels = pred
    return {"accuracy": float(np.mean(preds[:, :-1] == labels[:, 1:]))}


def _argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def train_tiny(output_dir: str, report_to: Any, **overrides: Any) -> Trainer:
    """6 optimizer steps of a 2-layer GPT-2, logging every 2 steps and evaluating every 3."""
    base: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        report_to=report_to,
        run_name="tiny-run",
        disable_tqdm=True,
        use_cpu=True,
    )
    base.update(overrides)
    trainer = Trainer(
        tiny_gpt2(),
        TrainingArguments(**base),
        train_dataset=lm_examples(24, min_len=8, max_len=8),
        eval_dataset=lm_examples(8, seed=1, min_len=8, max_len=8),
        data_collator=pad_lm_batch,
        compute_metrics=_next_token_accuracy,
        preprocess_logits_for_metrics=_argmax,
    )
    trainer.train()
    return trainer


def logged_values(trainer: Trainer) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for every number in ``trainer.state.log_history``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(key, []).append((entry["step"], float(value)))
    return out
