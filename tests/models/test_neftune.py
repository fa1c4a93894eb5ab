"""NEFTune: noise on the input embeddings while training only, reproducible, removed afterwards."""

from __future__ import annotations

import pytest
import torch

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.models.neftune import input_embeddings, neftune_noise
from tests.helpers import RegressionModel, lm_examples, pad_lm_batch, tiny_gpt2

BATCH = pad_lm_batch(lm_examples(4, seed=9))


def _args(out, **overrides) -> TrainingArguments:
    kw: dict = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=5,
        optim="adamw_torch",
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _trainer(out, **overrides) -> Trainer:
    return Trainer(
        model_init=lambda: tiny_gpt2(0),
        args=_args(out, **overrides),
        train_dataset=lm_examples(32, seed=1),
        data_collator=pad_lm_batch,
    )


def _losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _logits(model, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(**BATCH).logits


class CheckDuringTraining(TrainerCallback):
    """At the first step: noise in training mode, none in eval mode (the weights are still initial)."""

    def __init__(self) -> None:
        self.checked = False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            clean = tiny_gpt2(0)
            assert torch.equal(_logits(model, train=False), _logits(clean, train=False))
            assert not torch.equal(_logits(model, train=True), _logits(clean, train=True))
            model.train()
            self.checked = True


def test_noise_changes_training_not_eval_and_is_removed_after(tmp_path):
    plain = _trainer(tmp_path / "plain")
    plain.train()
    noisy = _trainer(tmp_path / "noisy", neftune_noise_alpha=5.0)
    check = CheckDuringTraining()
    noisy.add_callback(check)
    noisy.train()
    assert check.checked
    assert _losses(plain) != _losses(noisy)
    embeddings = input_embeddings(noisy.model)
    assert not embeddings._forward_hooks  # removed at the end of train()
    # After training the model is deterministic in training mode again (tiny_gpt2 has no dropout).
    assert torch.equal(_logits(noisy.model, train=True), _logits(noisy.model, train=True))
    again = _trainer(tmp_path / "again", neftune_noise_alpha=5.0)
    again.add_callback(CheckDuringTraining())  # its noisy forward draws from the generator too
    again.train()
    assert _losses(again) == _losses(noisy)  # the same seed gives the same noise


def test_noise_resumes_bit_exactly(tmp_path):
    class Crash(Exception):
        pass

    class CrashAt2(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Crash

    reference = _trainer(tmp_path / "ref", neftune_noise_alpha=5.0)
    reference.train()
    first = _trainer(tmp_path / "run", neftune_noise_alpha=5.0)
    first.add_callback(CrashAt2())
    with pytest.raises(Crash):
        first.train()
    assert not input_embeddings(first.model)._forward_hooks  # removed on the way out, too
    resumed = _trainer(tmp_path / "run", neftune_noise_alpha=5.0)
    resumed.train(resume_from_checkpoint=True)
    assert _losses(resumed) == _losses(reference)
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_noise_magnitude_follows_alpha_over_sqrt_of_length_times_width():
    model = tiny_gpt2(0)
    ids = BATCH["input_ids"]
    emb = input_embeddings(model)
    clean = emb(ids)
    with neftune_noise(model, 5.0):
        noisy = emb(ids)
    bound = 5.0 / (ids.shape[1] * clean.shape[-1]) ** 0.5
    diff = (noisy - clean).abs()
    assert 0 < float(diff.max()) <= bound * (1 + 1e-6)
    assert float(diff.max()) > 0.5 * bound


def test_bad_alpha_and_model_without_embeddings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        TrainingArguments(neftune_noise_alpha=0.0)
    with pytest.raises(ValueError, match="get_input_embeddings"), neftune_noise(RegressionModel(), 5.0):
        pass
