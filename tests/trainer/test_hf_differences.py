"""The differences transformers' own Trainer tests showed (issue 21): each test here failed on ember
before the fix. transformers' tests read warnings by patching `logger.warning` and looking at its
first argument, so the names must be in the message itself, not in %-style arguments."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.callbacks import CallbackHandler, PrinterCallback
from ember.callbacks.state import ExportableState, TrainerControl
from tests.helpers import RegressionDataset, RegressionModel


def _args(tmp_path: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path),
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=0.1,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path: Path, callbacks: Any = None, **kw: Any) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        model=RegressionModel(),
        args=_args(tmp_path, **kw),
        train_dataset=RegressionDataset(32),
        eval_dataset=RegressionDataset(16, seed=1),
        callbacks=callbacks,
    )


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The messages as passed to the logger (record.msg), before %-formatting."""
    return [str(r.msg) for r in caplog.records if r.levelno == level]


def test_running_training_block_is_logged_at_info(tmp_path, caplog):
    trainer = _trainer(tmp_path, max_steps=5, gradient_accumulation_steps=2)
    with caplog.at_level(logging.INFO, logger="ember"):
        trainer.train()
    text = "\n".join(_messages(caplog, logging.INFO))
    assert "***** Running training *****" in text
    for line in (
        "Num examples = 32",
        "Num Epochs = 2",
        "Instantaneous batch size per device = 4",
        "Total train batch size (w. parallel, distributed & accumulation) = 8",
        "Gradient Accumulation steps = 2",
        "Total optimization steps = 5",
        f"Number of trainable parameters = {sum(p.numel() for p in trainer.model.parameters())}",
    ):
        assert line in text


def test_init_memory_metrics_with_skip_memory_metrics_false(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, skip_memory_metrics=False)
    metrics = trainer.train().metrics
    for key in ("init_mem_cpu_alloc_delta", "init_mem_cpu_peaked_delta", "train_mem_cpu_alloc_delta"):
        assert isinstance(metrics[key], int)
    # Only the first train() reports the construction's memory, as transformers.
    assert "init_mem_cpu_alloc_delta" not in trainer.train().metrics


class Recorder(TrainerCallback):
    pass


def test_callback_added_twice_warns_with_its_name(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, callbacks=[Recorder, Recorder])
    assert any("Recorder" in m for m in _messages(caplog, logging.WARNING))


def test_handler_without_default_flow_callback_warns(caplog):
    with caplog.at_level(logging.WARNING):
        CallbackHandler([PrinterCallback()], None, None, None, None)
    assert any("DefaultFlowCallback" in m for m in _messages(caplog, logging.WARNING))


class Stateful(TrainerCallback, ExportableState):
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state(self) -> dict[str, Any]:
        return {"args": {"value": self.value}, "attributes": {}}


def test_stateful_callback_missing_on_resume_warns_with_its_name(tmp_path, caplog):
    _trainer(tmp_path, callbacks=[Stateful(3)], max_steps=2, save_strategy="steps", save_steps=2).train()
    resumed = _trainer(
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        restore_callback_states_from_checkpoint=True,
    )
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert any("Stateful" in m for m in _messages(caplog, logging.WARNING))


def test_label_smoothing_on_a_multi_label_model_warns_as_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        problem_type="multi_label_classification",
    )
    model = transformers.BertForSequenceClassification(config)
    with pytest.warns(UserWarning, match="multi-label"):
        trainer = Trainer(
            model=model, args=TrainingArguments("unused", label_smoothing_factor=0.1, use_cpu=True)
        )
    assert trainer._label_smoothing == 0.0


def test_resume_warning_names_the_values_as_transformers(tmp_path, caplog):
    _trainer(tmp_path, max_steps=10, save_strategy="steps", save_steps=5, eval_steps=5).train()
    resumed = _trainer(
        tmp_path,
        max_steps=10,
        save_strategy="steps",
        save_steps=10,
        eval_steps=10,
        per_device_train_batch_size=8,
    )
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    text = "\n".join(_messages(caplog, logging.WARNING))
    assert "save_steps: 10 (from args) != 5 (from trainer_state.json)" in text
    assert "eval_steps: 10 (from args) != 5 (from trainer_state.json)" in text
    assert "per_device_train_batch_size: 8 (from args) != 4 (from trainer_state.json)" in text


class CudaOOMAtStepEnd(TrainerCallback):
    """What transformers' tests do: report a CUDA out-of-memory while the batch is 16 or more."""

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.train_batch_size >= 16:
            raise RuntimeError("CUDA out of memory.")


def test_auto_find_batch_size_recognises_cuda_oom_and_resumes_with_the_found_batch(tmp_path):
    kw = dict(max_steps=2, save_strategy="steps", save_steps=1, per_device_train_batch_size=16)
    trainer = _trainer(tmp_path, callbacks=[CudaOOMAtStepEnd()], auto_find_batch_size=True, **kw)
    trainer.train()
    found = trainer._train_batch_size
    assert found < 16 and trainer.state.train_batch_size == found
    fresh = _trainer(tmp_path, auto_find_batch_size=True, **kw)
    assert fresh._train_batch_size == 16
    fresh.train(resume_from_checkpoint=True)
    assert fresh._train_batch_size == found


def test_predict_with_batch_eval_metrics_returns_predictions_and_metrics(tmp_path):
    seen: list[Any] = []

    def batched(pred: Any, compute_result: bool = False) -> dict[str, float]:
        assert pred.predictions is not None and pred.label_ids is not None
        seen.append(pred.predictions)
        return {"rows": float(sum(len(p) for p in seen))} if compute_result else {}

    trainer = _trainer(tmp_path, batch_eval_metrics=True, per_device_eval_batch_size=4)
    trainer.compute_metrics = batched
    data = RegressionDataset(10, seed=1)
    out = trainer.predict(data)
    assert out.predictions is not None and out.predictions.shape == (10,)
    with torch.no_grad():
        want = trainer.model(data.x)[0].numpy()
    assert np.allclose(out.predictions, want, atol=1e-6)
    assert out.metrics["test_rows"] == 10.0


def test_trainer_control_reset_helpers_and_callback_state_loader(tmp_path):
    control = TrainerControl(should_training_stop=True, should_epoch_stop=True, should_save=True)
    control.should_evaluate = control.should_log = True
    control._new_step()
    assert not (control.should_save or control.should_evaluate or control.should_log)
    control._new_epoch()
    assert not control.should_epoch_stop and control.should_training_stop
    control._new_training()
    assert not control.should_training_stop

    trainer = _trainer(tmp_path, callbacks=[Stateful(0)], restore_callback_states_from_checkpoint=True)
    trainer.state.stateful_callbacks = {
        "Stateful": {"args": {"value": 7}, "attributes": {}},
        "TrainerControl": {"args": {"should_training_stop": True}, "attributes": {}},
    }
    trainer._load_callback_state()
    assert next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Stateful)).value == 7
    assert trainer.control.should_training_stop
