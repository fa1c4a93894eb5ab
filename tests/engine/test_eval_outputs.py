"""eval_do_concat_batches=False (a list per batch) and eval_use_gather_object=True (Python objects
from a custom prediction_step gathered and kept in order), as transformers returns them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ember import Trainer, TrainingArguments
from tests.helpers import RegressionDataset, RegressionModel


def _args(tmp_path: Any, **kw: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=4, **kw
    )


def test_eval_do_concat_batches_false_returns_one_array_per_batch(tmp_path):
    torch.manual_seed(0)
    data = RegressionDataset(10)
    trainer = Trainer(model=RegressionModel(), args=_args(tmp_path, eval_do_concat_batches=False))
    out = trainer.predict(data)
    assert isinstance(out.predictions, list) and [len(p) for p in out.predictions] == [4, 4, 2]
    assert isinstance(out.label_ids, list) and np.allclose(np.concatenate(out.label_ids), data.y.numpy())
    torch.manual_seed(0)
    whole = Trainer(model=RegressionModel(), args=_args(tmp_path / "b")).predict(data)
    assert np.allclose(np.concatenate(out.predictions), whole.predictions)


class WordPredictions(Trainer):
    """A prediction_step that returns Python objects, as generation-style subclasses do."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # type: ignore[no-untyped-def]
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        words = [f"x={float(x):.3f}" for x in inputs["input_x"]]
        return loss, words, labels


def test_eval_use_gather_object_keeps_python_predictions(tmp_path):
    data = RegressionDataset(10)
    seen: list[Any] = []

    def metrics(pred: Any) -> dict[str, float]:
        seen.append(pred.predictions)
        return {"n": float(len(pred.predictions))}

    trainer = WordPredictions(
        model=RegressionModel(), args=_args(tmp_path, eval_use_gather_object=True), compute_metrics=metrics
    )
    out = trainer.predict(data)
    assert out.predictions == [f"x={float(x):.3f}" for x in data.x]
    assert out.metrics["test_n"] == 10.0 and seen[0] == out.predictions
