"""The evaluation loop (`ember.engine.evaluation_loop`) on one process: sample-weighted loss, bounded
accumulation, streaming metrics, padding, and gathering through the strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ember import Trainer, TrainingArguments
from ember.engine.evaluation_loop import _mean_loss, concat_padded, evaluation_loop
from tests.helpers import RegressionDataset, RegressionModel


def _trainer(tmp_path, compute_metrics=None, **kw) -> Trainer:
    args = TrainingArguments(
        str(tmp_path), per_device_eval_batch_size=5, report_to="none", disable_tqdm=True, use_cpu=True, **kw
    )
    torch.manual_seed(0)
    return Trainer(model=RegressionModel(), args=args, compute_metrics=compute_metrics)


def _mse(pred) -> dict[str, float]:
    return {"mse": float(((pred.predictions - pred.label_ids) ** 2).mean())}


def test_loss_is_weighted_by_samples_and_predictions_cover_every_row(tmp_path):
    data = RegressionDataset(13)  # batches of 5, 5, 3: a plain mean of batch means would differ
    trainer = _trainer(tmp_path, compute_metrics=_mse)
    out = evaluation_loop(trainer, trainer.get_eval_dataloader(data), "Evaluation")
    with torch.no_grad():
        pred = trainer.model(data.x)[0]
    want = float(((pred - data.y) ** 2).mean())
    assert out.num_samples == 13 and out.predictions.shape == (13,)
    assert out.metrics["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert out.metrics["eval_mse"] == pytest.approx(want, rel=1e-5)


def test_offloading_every_batch_and_streaming_metrics_give_the_same_result(tmp_path):
    data = RegressionDataset(13)
    full = _trainer(tmp_path / "full", compute_metrics=_mse)
    want = evaluation_loop(full, full.get_eval_dataloader(data), "Evaluation")
    offloaded = _trainer(tmp_path / "off", compute_metrics=_mse, eval_accumulation_steps=1)
    got = evaluation_loop(offloaded, offloaded.get_eval_dataloader(data), "Evaluation")
    np.testing.assert_array_equal(got.predictions, want.predictions)

    class Streaming:
        def __init__(self) -> None:
            self.sq, self.n = 0.0, 0

        def __call__(self, pred, compute_result: bool) -> dict[str, float]:
            self.sq += float(((pred.predictions - pred.label_ids) ** 2).sum())
            self.n += len(pred.label_ids)
            return {"mse": self.sq / self.n} if compute_result else {}

    streaming = _trainer(tmp_path / "stream", compute_metrics=Streaming(), batch_eval_metrics=True)
    out = evaluation_loop(streaming, streaming.get_eval_dataloader(data), "Evaluation")
    assert out.predictions is None  # nothing held: memory stays flat in the dataset size
    assert out.metrics["eval_mse"] == pytest.approx(want.metrics["eval_mse"], rel=1e-6)


def test_one_process_gathers_through_the_strategy_without_asking_the_world_size(tmp_path):
    trainer = _trainer(tmp_path, compute_metrics=_mse)
    calls: list[tuple[int, ...]] = []
    gather = trainer.strategy.gather
    trainer.strategy.gather = lambda t: calls.append(tuple(t.shape)) or gather(t)  # type: ignore[method-assign]
    evaluation_loop(trainer, trainer.get_eval_dataloader(RegressionDataset(7)), "Evaluation")
    assert calls == [(5,), (5,), (2,), (2,)]  # predictions and labels of each batch


def test_concat_pads_sequences_with_the_ignore_index():
    out = concat_padded([torch.ones(1, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)])
    assert out.tolist() == [[1, 1, -100], [0, 0, 0], [0, 0, 0]]


def test_mean_loss_filters_non_finite_batches_only_when_asked():
    sums = torch.tensor([math.inf, 6.0, 3.0], dtype=torch.float64)  # a batch of 2 was inf
    assert _mean_loss(sums, 5, filter_nan_inf=True) == 2.0
    assert _mean_loss(sums, 5, filter_nan_inf=False) == math.inf
    assert _mean_loss(torch.zeros(3, dtype=torch.float64), 0, filter_nan_inf=False) is None
