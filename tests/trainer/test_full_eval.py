"""bf16_full_eval / fp16_full_eval: evaluate() outside train() runs the model cast to half
precision, as transformers; the evaluations inside train() keep the training dtype."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from ember import Trainer, TrainingArguments
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2


def _trainer(tmp_path: Any, **kw: Any) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, **kw
    )
    return Trainer(
        model=tiny_gpt2(seed=0),
        args=args,
        train_dataset=lm_examples(8, seed=1),
        eval_dataset=lm_examples(6, seed=2),
        data_collator=pad_lm_batch,
    )


@pytest.mark.parametrize(
    ("field", "dtype"), [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)]
)
def test_evaluate_runs_the_model_in_half_precision(tmp_path, field, dtype):
    trainer = _trainer(tmp_path, per_device_eval_batch_size=6, **{field: True})
    reference = copy.deepcopy(trainer.model).to(dtype).eval()
    loss = trainer.evaluate()["eval_loss"]
    assert next(trainer.model.parameters()).dtype == dtype
    with torch.no_grad():
        want = float(reference(**pad_lm_batch(lm_examples(6, seed=2))).loss)
    assert loss == pytest.approx(want, rel=1e-6)


def test_evaluations_during_training_keep_the_training_dtype(tmp_path):
    seen: list[torch.dtype] = []
    trainer = _trainer(tmp_path, bf16_full_eval=True, max_steps=2, eval_strategy="steps", eval_steps=1)
    forward = trainer.model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        if not trainer.model.training:
            seen.append(next(trainer.model.parameters()).dtype)
        return forward(*args, **kwargs)

    trainer.model.forward = spy  # type: ignore[method-assign]
    trainer.train()
    assert seen and set(seen) == {torch.float32}
