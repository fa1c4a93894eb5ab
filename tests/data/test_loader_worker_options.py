"""dataloader_multiprocessing_context and dataloader_in_order reach the DataLoader, as in transformers."""

from __future__ import annotations

import pytest
import torch

from ember import Trainer, TrainingArguments
from ember.data.loaders import build_eval_dataloader, build_train_dataloader
from tests.helpers import RegressionDataset, RegressionModel


def _args(tmp_path, **kw):  # type: ignore[no-untyped-def]
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)


def test_spawned_workers_train_the_same_weights_as_the_main_process(tmp_path):
    weights = []
    for kw in ({}, {"dataloader_num_workers": 1, "dataloader_multiprocessing_context": "spawn"}):
        torch.manual_seed(0)
        args = _args(tmp_path / str(len(weights)), max_steps=3, save_strategy="no", disable_tqdm=True, **kw)
        trainer = Trainer(model=RegressionModel(), args=args, train_dataset=RegressionDataset(24))
        if kw:
            loader = trainer.get_train_dataloader()
            assert loader.multiprocessing_context.get_start_method() == "spawn"
        trainer.train()
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_in_order_false_reaches_the_loaders(tmp_path):
    args = _args(tmp_path, dataloader_num_workers=2, dataloader_in_order=False)
    assert build_train_dataloader(RegressionDataset(8), args).in_order is False
    assert build_eval_dataloader(RegressionDataset(8), args).in_order is False
    assert build_train_dataloader(RegressionDataset(8), _args(tmp_path, dataloader_num_workers=2)).in_order


def test_an_unknown_start_method_is_refused_with_the_field_name(tmp_path):
    with pytest.raises(ValueError, match="dataloader_multiprocessing_context.*threads"):
        _args(tmp_path, dataloader_multiprocessing_context="threads")
