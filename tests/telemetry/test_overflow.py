"""debug="underflow_overflow": a model made to overflow stops with the module named; a healthy run is
the same with and without the detector, and the hooks are gone after train()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ember import Trainer, TrainingArguments
from ember.telemetry.overflow import UnderflowOverflowDetector, UnderflowOverflowError
from tests.helpers import RegressionDataset, RegressionModel


def _trainer(tmp_path: Path, model: torch.nn.Module, **kw: Any) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        learning_rate=0.1,
        logging_steps=1,
        max_steps=4,
        **kw,
    )
    return Trainer(model=model, args=args, train_dataset=RegressionDataset(32))


def _overflowing_model() -> RegressionModel:
    torch.manual_seed(0)
    model = RegressionModel()
    with torch.no_grad():
        # hidden stays finite (|x| * 1e37 < 3.4e38 for these inputs) and tanh saturates at +-1;
        # out then sums eight terms of 1e38 of one sign: 8e38 overflows fp32 to inf.
        model.hidden.weight.fill_(1e37)
        model.hidden.bias.zero_()
        model.out.weight.fill_(1e38)
    return model


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_an_overflowing_module_stops_training_with_its_name_and_step(tmp_path):
    model = _overflowing_model()
    trainer = _trainer(tmp_path, model, debug="underflow_overflow")
    with pytest.raises(UnderflowOverflowError) as info:
        trainer.train()
    error = info.value
    assert isinstance(error, ValueError)  # what transformers raises, so the same except clauses catch it
    assert (error.module, error.tensor, error.step) == ("out", "output", 1)
    assert "`out` (Linear)" in str(error) and "step 1" in str(error)
    # The frames lead up to it: hidden's output is huge but finite, the last frame is the culprit.
    assert error.frames[-1].startswith("out (Linear)") and "inf/nan" in error.frames[-1]
    assert any(f.startswith("hidden (Linear)") and "1.0" in f for f in error.frames)
    assert trainer.state.global_step == 0
    assert _hook_count(model) == 0  # removed even when training stops with the error


def test_without_debug_only_the_step_guard_stops_later_and_names_no_module(tmp_path):
    from ember.engine.guards import NonFiniteStepError

    trainer = _trainer(tmp_path, _overflowing_model())
    with pytest.raises(NonFiniteStepError) as info:
        trainer.train()
    assert "`out`" not in str(info.value) and trainer.state.global_step >= 2


def test_a_nan_weight_is_named(tmp_path):
    torch.manual_seed(0)
    model = RegressionModel()
    with torch.no_grad():
        model.hidden.bias[3] = float("nan")
    detector = UnderflowOverflowDetector(model, step=lambda: 7)
    with pytest.raises(UnderflowOverflowError, match=r"`bias` of module `hidden` \(Linear\) in step 7"):
        model(torch.randn(4))
    detector.remove()
    assert _hook_count(model) == 0


def test_a_healthy_run_is_unchanged(tmp_path):
    def run(debug: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        trainer = _trainer(tmp_path / (debug or "off"), RegressionModel(dropout=0.1), debug=debug)
        trainer.train()
        assert _hook_count(trainer.model) == 0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    plain_losses, plain = run("")
    watched_losses, watched = run("underflow_overflow")
    assert len(plain_losses) == 4 and plain_losses == watched_losses
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_debug_spellings_as_transformers():
    from transformers.debug_utils import DebugOption

    assert TrainingArguments(debug="underflow_overflow").debug == ["underflow_overflow"]
    assert TrainingArguments(debug=["underflow_overflow"]).debug == ["underflow_overflow"]
    assert TrainingArguments(debug=[DebugOption.UNDERFLOW_OVERFLOW]).debug == ["underflow_overflow"]
    assert TrainingArguments(debug=None).debug == [] and TrainingArguments().debug == []
    assert DebugOption.UNDERFLOW_OVERFLOW in TrainingArguments(debug="underflow_overflow").debug
    with pytest.raises(ValueError, match="TPU"):
        TrainingArguments(debug="tpu_metrics_debug")
    with pytest.raises(ValueError, match="Did you mean 'underflow_overflow'"):
        TrainingArguments(debug="underflow_overflw")
