"""The smaller members of transformers' Trainer that scripts and subclasses call."""

from __future__ import annotations

import pytest
import torch
import transformers

from ember import Trainer, TrainingArguments
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2

# Members of transformers 5.24's Trainer that ember leaves out on purpose (docs/compatibility.md says why).
LEFT_OUT = {
    "create_accelerator_and_postprocess",
    "get_optimizer_cls_and_kwargs",
    "loss_is_scaled_for_ga",
    "set_initial_training_values",
}


def _trainer(tmp_path, **kw) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        max_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        **kw,
    )
    return Trainer(tiny_gpt2(0), args, train_dataset=lm_examples(16), data_collator=pad_lm_batch)


@pytest.mark.surface  # compares with the locked transformers; `make compat` reports drift
def test_every_public_member_of_transformers_trainer_exists_or_is_listed_as_left_out():
    theirs = {n for n in dir(transformers.Trainer) if not n.startswith("_")}
    ours = {n for n in dir(Trainer) if not n.startswith("_")}
    assert theirs - ours == LEFT_OUT


def test_batch_size_helpers_and_batch_samples(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.get_total_train_batch_size(trainer.args) == 12
    assert (trainer.get_tp_size(), trainer.get_cp_size(), trainer.get_sp_size()) == (1, 1, 1)
    batches = [pad_lm_batch(lm_examples(4, seed=s)) for s in range(3)]
    got, count = trainer.get_batch_samples(iter(batches), 5, torch.device("cpu"))
    assert len(got) == 3
    # The causal shift drops one target per row: the count the step's loss is divided by.
    expected = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert int(count) == expected
    names = trainer.get_decay_parameter_names(trainer.model)
    assert "transformer.h.0.attn.c_attn.weight" in names and not any(n.endswith(".bias") for n in names)


def test_contexts_and_evaluation_loop_and_hub(tmp_path):
    trainer = _trainer(tmp_path, bf16=True)
    with trainer.compute_loss_context_manager():
        out = trainer.model(**pad_lm_batch(lm_examples(2)))
    assert out.logits.dtype == torch.bfloat16  # autocast was on
    loader = trainer.get_eval_dataloader(lm_examples(6, seed=4))
    result = trainer.evaluation_loop(loader, "Evaluation", prediction_loss_only=True)
    assert result.num_samples == 6 and result.metrics["eval_loss"] > 0
    assert trainer.hub_model_id is None  # push_to_hub is off: no repo was asked for
    trainer.end()  # one process: nothing to tear down, and no error


# `make compat` runs these against the newest transformers, peft, accelerate and datasets.
pytestmark = pytest.mark.dropin
