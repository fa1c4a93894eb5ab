"""Precision objects: built once from the arguments, held by the strategy; bf16 autocasts on CPU."""

from __future__ import annotations

import math

import torch

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.strategy.precision import Bf16Precision, FullPrecision, Precision, build_precision
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2


class LogitDtypes(TrainerCallback):
    """Records the dtype the model computes in, through a forward hook on the LM head."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.lm_head.register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype))


def _args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(
        str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        **kw,
    )


def test_bf16_trains_under_autocast_on_cpu_with_fp32_weights(tmp_path):
    seen = LogitDtypes()
    trainer = Trainer(
        model=tiny_gpt2(),
        args=_args(tmp_path, bf16=True),
        train_dataset=lm_examples(8),
        data_collator=pad_lm_batch,
        callbacks=[seen],
    )
    assert isinstance(trainer.precision, Bf16Precision) and trainer.precision.dtype == torch.bfloat16
    assert trainer.precision is trainer.strategy.precision  # one object, held by the strategy
    out = trainer.train()
    assert seen.dtypes == {torch.bfloat16}
    assert math.isfinite(out.training_loss)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # master weights stay fp32


def test_full_precision_is_a_no_op_and_has_no_state(tmp_path):
    precision = build_precision(_args(tmp_path), torch.device("cpu"))
    assert isinstance(precision, FullPrecision) and isinstance(precision, Precision)
    assert precision.dtype is None and precision.state_dict() == {}
    loss = torch.tensor(2.0)
    assert precision.scale(loss) is loss and not precision.step_was_skipped()
    with precision.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
