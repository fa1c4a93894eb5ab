"""One optimizer step (`ember.engine.step`): exact loss normalisation over micro-batches, the events it
fires, what it reports, and micro-batch grouping."""

from __future__ import annotations

import pytest
import torch

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.engine.guards import StepGuard
from ember.engine.run_position import LossTracker, RunProgress
from ember.engine.step import StepContext, grouped, run_optimizer_step
from tests.helpers import lm_examples, max_param_diff, pad_lm_batch, params_of, tiny_gpt2


class Events(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_substep_end(self, args, state, control, **kwargs):
        self.seen.append("substep")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append("pre_optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append("optimizer")


def _trainer(tmp_path, **kw) -> Trainer:
    args = TrainingArguments(
        str(tmp_path),
        learning_rate=1e-2,
        warmup_steps=2,
        optim="adamw_torch",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        **kw,
    )
    trainer = Trainer(model=tiny_gpt2(seed=0), args=args, train_dataset=lm_examples(8))
    trainer.create_optimizer_and_scheduler(10)
    trainer.model.train()
    return trainer


def _parts(trainer: Trainer) -> StepContext:
    """The step's parts as train() builds them, from a trainer that has not started a run."""
    args, strategy = trainer.args, trainer.strategy
    assert trainer.optimizer is not None
    return StepContext(
        args=args,
        state=trainer.state,
        strategy=strategy,
        model_wrapped=trainer.model,
        optimizer=trainer.optimizer,
        lr_scheduler=trainer.lr_scheduler,
        label_shift=trainer.label_shift,
        progress=RunProgress(LossTracker(strategy.device, args.logging_nan_inf_filter)),
        guard=StepGuard(args, trainer.precision.skips_nonfinite_steps, strategy.grad_norm_before_step),
        training_step=trainer.training_step,
        fire=trainer._fire,
    )


def test_accumulated_micro_batches_make_the_step_of_one_big_batch(tmp_path):
    examples = lm_examples(6, seed=3)  # lengths differ, so the two halves hold different target counts
    big = _trainer(tmp_path / "big")
    run_optimizer_step(_parts(big), [pad_lm_batch(examples)])
    split = _trainer(tmp_path / "split", gradient_accumulation_steps=2)
    step = run_optimizer_step(_parts(split), [pad_lm_batch(examples[:2]), pad_lm_batch(examples[2:])])
    assert max_param_diff(params_of(big.model), params_of(split.model)) < 1e-6
    assert step.loss.dim() == 0 and torch.isfinite(step.loss)


def test_a_micro_batch_without_targets_adds_nothing(tmp_path):
    examples = lm_examples(4, seed=5)
    empty = pad_lm_batch(examples[:2])
    empty["labels"].fill_(-100)
    plain = _trainer(tmp_path / "plain")
    run_optimizer_step(_parts(plain), [pad_lm_batch(examples[2:])])
    padded = _trainer(tmp_path / "padded", gradient_accumulation_steps=2)
    run_optimizer_step(_parts(padded), [empty, pad_lm_batch(examples[2:])])
    assert max_param_diff(params_of(plain.model), params_of(padded.model)) == 0.0


def test_events_order_and_the_rate_reported_is_the_one_the_update_used(tmp_path):
    trainer = _trainer(tmp_path, gradient_accumulation_steps=3, max_grad_norm=1.0)
    events = Events()
    trainer.add_callback(events)
    before = trainer.get_learning_rates()[0]
    batches = [pad_lm_batch(lm_examples(2, seed=s)) for s in range(3)]
    step = run_optimizer_step(_parts(trainer), batches)
    assert events.seen == ["substep", "substep", "pre_optimizer", "optimizer"]
    assert step.learning_rate == before and trainer.get_learning_rates()[0] != before  # warmup moved on
    assert step.grad_norm is not None and float(step.grad_norm) > 0
    assert all(p.grad is None for p in trainer.model.parameters())  # zeroed for the next step


@pytest.mark.parametrize(("n", "size", "want"), [(5, 2, [2, 2, 1]), (4, 2, [2, 2]), (0, 3, []), (2, 4, [2])])
def test_grouped_fetches_whole_steps(n, size, want):
    assert [len(g) for g in grouped(range(n), size)] == want
    assert [x for g in grouped(range(n), size) for x in g] == list(range(n))
