"""Step guards: non-finite steps are skipped (or stop training), loss spikes are rolled back."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset

from ember import Trainer, TrainingArguments
from ember.engine.guards import NonFiniteStepError
from tests.helpers import RegressionModel, params_of

BATCH = 4


class Batches(IterableDataset):  # type: ignore[type-arg]
    """Fixed regression items, in order; items of the batches in `poisoned` get a NaN input."""

    def __init__(
        self,
        n_batches: int,
        poisoned: tuple[int, ...] = (),
        drop: tuple[int, ...] = (),
        spiked: tuple[int, ...] = (),
    ) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n_batches * BATCH, generator=g)
        self.y = 2.0 * self.x + 3.0
        for b in spiked:  # labels a hundred times too large: a corrupt batch with a finite loss
            self.y[b * BATCH : (b + 1) * BATCH] *= 100
        self.poisoned, self.drop = set(poisoned), set(drop)

    def __iter__(self) -> Any:
        for i in range(len(self.x)):
            if i // BATCH in self.drop:
                continue
            x = self.x[i] * float("nan") if i // BATCH in self.poisoned else self.x[i]
            yield {"input_x": x, "labels": self.y[i]}


def _trainer(tmp_path, data: Any, steps: int, **kw: Any) -> Trainer:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        optim="adamw_torch",
        use_cpu=True,
        seed=0,
    )
    base.update(kw)
    torch.manual_seed(0)
    return Trainer(model=RegressionModel(), args=TrainingArguments(**base), train_dataset=data)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # clipping on: its norm; off: computed for the check
def test_a_nan_batch_is_skipped_and_equals_a_run_without_it(tmp_path, caplog, max_grad_norm):
    poisoned = _trainer(tmp_path / "a", Batches(6, poisoned=(2,)), 6, max_grad_norm=max_grad_norm)
    with caplog.at_level(logging.WARNING, logger="ember"):
        poisoned.train()
    without = _trainer(tmp_path / "b", Batches(6, drop=(2,)), 5, max_grad_norm=max_grad_norm)
    without.train()
    got, want = params_of(poisoned.model), params_of(without.model)
    assert all(torch.isfinite(v).all() for v in got.values())
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert poisoned.step_guard.nonfinite_steps == 1
    # The count is in the logs from the skipped step on, and the warning names the step and batch.
    step_logs = [h for h in poisoned.state.log_history if "learning_rate" in h]
    counted = [h.get("nonfinite_steps") for h in step_logs]
    assert counted == [None, None, 1.0, 1.0, 1.0, 1.0]
    assert "step 3 (epoch 0, micro-batches 2-2 of the epoch)" in caplog.text
    assert poisoned.state.global_step == 6
    # The skipped step has no loss (not a loss of 0): its entry says it skipped, and train_loss is
    # the mean of the five real steps, the same as the run that never saw the batch.
    assert "loss" not in step_logs[2] and step_logs[2]["skipped_steps"] == 1.0
    assert all("skipped_steps" not in h for i, h in enumerate(step_logs) if i != 2)
    real = [h["loss"] for h in without.state.log_history if "loss" in h]
    assert [h["loss"] for h in step_logs if "loss" in h] == real
    train_loss = poisoned.state.log_history[-1]["train_loss"]
    assert train_loss == without.state.log_history[-1]["train_loss"]
    assert train_loss == pytest.approx(sum(real) / 5)


def test_a_skipped_step_is_left_out_of_a_longer_log_window(tmp_path):
    # logging_steps=3: the window holding the skipped step averages its two real steps only.
    poisoned = _trainer(tmp_path / "a", Batches(6, poisoned=(1,)), 6, logging_steps=3)
    poisoned.train()
    without = _trainer(tmp_path / "b", Batches(6, drop=(1,)), 5, logging_steps=1)
    without.train()
    real = [h["loss"] for h in without.state.log_history if "loss" in h]
    windows = [h for h in poisoned.state.log_history if "learning_rate" in h]
    assert windows[0]["loss"] == pytest.approx((real[0] + real[1]) / 2)
    assert windows[0]["skipped_steps"] == 1.0 and "skipped_steps" not in windows[1]
    assert windows[1]["loss"] == pytest.approx(sum(real[2:]) / 3)
    assert poisoned.state.log_history[-1]["train_loss"] == pytest.approx(sum(real) / 5)


def test_with_accumulation_one_nan_micro_batch_skips_the_whole_step(tmp_path):
    poisoned = _trainer(
        tmp_path / "a", Batches(8, poisoned=(3,)), 4, gradient_accumulation_steps=2, max_grad_norm=0.0
    )
    poisoned.train()
    without = _trainer(
        tmp_path / "b", Batches(8, drop=(2, 3)), 3, gradient_accumulation_steps=2, max_grad_norm=0.0
    )
    without.train()
    got, want = params_of(poisoned.model), params_of(without.model)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_consecutive_nonfinite_steps_stop_with_an_error_naming_the_field(tmp_path):
    trainer = _trainer(tmp_path, Batches(8, poisoned=(2, 3, 4, 5)), 8, max_consecutive_nonfinite_steps=3)
    with pytest.raises(NonFiniteStepError, match="max_consecutive_nonfinite_steps") as err:
        trainer.train()
    assert "3 optimizer steps in a row" in str(err.value)
    assert trainer.state.global_step == 4  # steps 3 and 4 skipped, step 5 raised
    assert all(torch.isfinite(v).all() for v in params_of(trainer.model).values())


def test_stop_policy_raises_at_the_first_nonfinite_step(tmp_path):
    trainer = _trainer(tmp_path, Batches(6, poisoned=(1,)), 6, nonfinite_step_policy="stop")
    with pytest.raises(NonFiniteStepError, match="nonfinite_step_policy='skip'"):
        trainer.train()
    assert trainer.state.global_step == 1


def test_ignore_policy_updates_anyway_as_transformers(tmp_path):
    trainer = _trainer(tmp_path, Batches(4, poisoned=(1,)), 4, nonfinite_step_policy="ignore")
    trainer.train()
    assert any(torch.isnan(v).any() for v in params_of(trainer.model).values())
    assert trainer.step_guard.nonfinite_steps == 0


def test_guard_fields_are_validated(tmp_path):
    with pytest.raises(ValueError, match="nonfinite_step_policy"):
        TrainingArguments(output_dir=str(tmp_path), nonfinite_step_policy="skipp")
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps"):
        TrainingArguments(output_dir=str(tmp_path), max_consecutive_nonfinite_steps=0)
    with pytest.raises(ValueError, match="loss_spike_zscore"):
        TrainingArguments(output_dir=str(tmp_path), loss_spike_zscore=math.nan)
    with pytest.raises(ValueError, match="loss_spike_window"):
        TrainingArguments(output_dir=str(tmp_path), loss_spike_window=1)


def _spike_run(tmp_path, data: Any, steps: int, **kw: Any) -> Trainer:
    return _trainer(tmp_path, data, steps, loss_spike_zscore=3.0, loss_spike_window=4, **kw)


def test_a_spike_right_after_a_kept_copy_only_drops_its_own_update(tmp_path, caplog):
    # Copies are kept after good steps 1, 4 and 8; batch 8 (step 9) spikes: rolling back to the
    # copy of step 8 is exactly a run that never saw batch 8.
    with caplog.at_level(logging.WARNING, logger="ember"):
        spiked = _spike_run(tmp_path / "a", Batches(12, spiked=(8,)), 12)
        spiked.train()
    without = _trainer(tmp_path / "b", Batches(12, drop=(8,)), 11)
    without.train()
    got, want = params_of(spiked.model), params_of(without.model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert spiked.step_guard.spikes is not None
    assert spiked.step_guard.spikes.rollbacks == [[0, 8]]
    assert "loss spike at step 9" in caplog.text
    assert spiked.state.global_step == 12


def test_a_spike_rolls_back_the_steps_since_the_last_copy(tmp_path):
    # Batch 10 spikes at step 11; the copy is from step 8, so steps 9-11 leave no trace.
    spiked = _spike_run(tmp_path / "a", Batches(14, spiked=(10,)), 14)
    spiked.train()
    without = _trainer(tmp_path / "b", Batches(14, drop=(8, 9, 10)), 11)
    without.train()
    got, want = params_of(spiked.model), params_of(without.model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert spiked.step_guard.spikes is not None and spiked.step_guard.spikes.rollbacks == [[0, 10]]


def test_without_spike_detection_the_spike_is_applied(tmp_path):
    plain = _trainer(tmp_path / "a", Batches(12, spiked=(8,)), 12)
    plain.train()
    without = _trainer(tmp_path / "b", Batches(12, drop=(8,)), 11)
    without.train()
    got, want = params_of(plain.model), params_of(without.model)
    assert not all(torch.equal(got[k], want[k]) for k in want)


def test_rollbacks_and_the_loss_window_survive_a_checkpoint(tmp_path):
    first = _spike_run(tmp_path / "a", Batches(12, spiked=(8,)), 12, save_strategy="steps", save_steps=10)
    first.train()
    resumed = _spike_run(tmp_path / "a", Batches(12, spiked=(8,)), 12)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-10"))
    assert resumed.step_guard.spikes is not None
    assert resumed.step_guard.spikes.rollbacks == [[0, 8]]
    assert len(resumed.step_guard.spikes.losses) == 4


# -- steps without targets ---------------------------------------------------------------------------


def _lm_run(tmp_path, empty: set[int], steps: int) -> Trainer:
    """Tiny GPT-2, GA=2; the micro-batches numbered in `empty` (in collation order) get labels -100."""
    from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2

    calls = [0]

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_lm_batch(features)
        if calls[0] in empty:
            batch["labels"][:] = -100
        calls[0] += 1
        return batch

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=True,
        optim="adamw_torch",
        logging_nan_inf_filter=False,  # a nan would reach the logs as it is
    )
    trainer = Trainer(
        model=tiny_gpt2(), args=args, train_dataset=lm_examples(12, seed=1), data_collator=collate
    )
    trainer.train()
    return trainer


def test_a_micro_batch_without_targets_adds_nothing_and_no_nan(tmp_path):
    # The model's own mean loss over zero targets is 0/0; its share of the step must be 0, not nan.
    trainer = _lm_run(tmp_path, {1}, 2)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert trainer.step_guard.nonfinite_steps == 0 and trainer.step_guard.empty_steps == 0


def test_a_step_without_targets_is_skipped_and_counted(tmp_path):
    # Step 2's micro-batches (collations 2 and 3) have no targets: the weights stay as after step 1.
    trainer = _lm_run(tmp_path / "a", {2, 3}, 2)
    one_step = _lm_run(tmp_path / "b", set(), 1)
    got, want = params_of(trainer.model), params_of(one_step.model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert trainer.step_guard.empty_steps == 1
    step_logs = [h for h in trainer.state.log_history if "learning_rate" in h]
    # No target is no loss, not a loss of 0: the entry says the step was skipped, and train_loss is
    # the loss of the one real step.
    assert "loss" not in step_logs[1] and step_logs[1]["empty_steps"] == 1.0
    assert step_logs[1]["skipped_steps"] == 1.0
    assert trainer.state.log_history[-1]["train_loss"] == step_logs[0]["loss"]
    assert trainer.state.log_history[-1]["train_loss"] == one_step.state.log_history[-1]["train_loss"]


def test_fp16_leaves_nonfinite_steps_to_its_scaler_and_a_dropped_step_closes_the_scaler_step():
    # GradScaler runs on CPU too, so the fp16 object is tested here; fp16 training itself needs CUDA.
    from ember.engine.guards import StepGuard
    from ember.strategy.precision import Fp16Precision

    precision = Fp16Precision(torch.device("cpu"))
    args = TrainingArguments(output_dir="unused", use_cpu=True)
    assert not StepGuard(args, precision.skips_nonfinite_steps, True).checks_nonfinite
    assert StepGuard(args, False, True).checks_nonfinite
    assert not StepGuard(args, False, grad_norm_before_step=False).checks_nonfinite  # DeepSpeed ZeRO

    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # without drop_step the second unscale_ raises
        precision.scale(model(torch.ones(1, 2)).sum()).backward()
        precision.unscale_(optimizer)
        precision.drop_step(optimizer)
        optimizer.zero_grad()
