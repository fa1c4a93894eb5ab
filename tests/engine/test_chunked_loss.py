"""Chunked linear + cross-entropy: the same loss and gradients as the plain path, without the logits."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ember import Trainer, TrainingArguments
from ember.engine.chunked_loss import _NOTICED, chunked_causal_lm_loss, linear_cross_entropy, why_not
from ember.engine.loss import smoothed_loss_sum
from tests import helpers
from tests.helpers import RegressionModel, lm_examples, max_param_diff, pad_lm_batch, params_of, tiny_gpt2

VOCAB = 97


def tiny_llama(tied: bool, seed: int = 0) -> nn.Module:
    return helpers.tiny_llama(seed, vocab=VOCAB, tied=tied)


def gpt2(tied: bool) -> nn.Module:
    model = tiny_gpt2(vocab=VOCAB)
    if not tied:
        from transformers import GPT2LMHeadModel

        config = model.config
        config.tie_word_embeddings = False
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    return model


MODELS = {
    "gpt2-tied": lambda: gpt2(True),
    "gpt2-untied": lambda: gpt2(False),
    "llama-tied": lambda: tiny_llama(True),
    "llama-untied": lambda: tiny_llama(False),
}


def padded_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = pad_lm_batch(lm_examples(n, vocab=VOCAB, seed=seed))
    batch["labels"][0, 2:5] = -100  # targets masked inside a sequence too, not only padding
    return batch


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = float(b.abs().max()) or 1.0
    assert float((a - b).abs().max()) <= rel * scale, float((a - b).abs().max()) / scale


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_gradients_equal_the_plain_path(name):
    model = MODELS[name]()
    head = model.get_output_embeddings().weight
    assert (head is model.get_input_embeddings().weight) == name.endswith("-tied")
    batch = padded_batch()
    plain = model(**batch).loss
    plain.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    # chunk of 7 tokens: several chunks, the last one partial
    chunked = chunked_causal_lm_loss(model, dict(batch), None, chunk_size=7)
    assert chunked is not None
    chunked.backward()
    got = grads(model)
    assert_close_rel(chunked.detach(), plain.detach())
    assert got.keys() == ref.keys()
    for key in ref:
        assert_close_rel(got[key], ref[key])


def test_normalises_by_the_steps_target_count():
    model = gpt2(True)
    batch = padded_batch()
    count = int((batch["labels"][:, 1:] != -100).sum())
    mean = chunked_causal_lm_loss(model, dict(batch), None, chunk_size=16)
    share = chunked_causal_lm_loss(model, dict(batch), torch.tensor(3 * count), chunk_size=16)
    assert mean is not None and share is not None
    assert_close_rel(share.detach() * 3, mean.detach())


def test_full_logits_are_never_saved_for_backward():
    model = gpt2(True)
    batch = padded_batch(8)
    chunk = 5
    tokens = batch["input_ids"].numel()
    shapes: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_causal_lm_loss(model, dict(batch), None, chunk_size=chunk)
    assert loss is not None and shapes
    big = [s for s in shapes if s and s[-1] == VOCAB and s.numel() > chunk * VOCAB]
    assert not big, big
    # the plain path does save them (the check can fail)
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    assert any(s and s[-1] == VOCAB and s.numel() >= tokens * VOCAB for s in shapes)


@pytest.mark.parametrize("bias", [False, True])
def test_label_smoothing_matches_the_plain_smoothed_loss(bias):
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    head = nn.Linear(16, VOCAB, bias=bias)
    labels = torch.randint(0, VOCAB, (3, 9))
    labels[1, 4:] = -100
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    got = linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk_size=4, smoothing=0.1)
    got.backward()
    g = [hidden.grad.clone(), head.weight.grad.clone()]
    hidden.grad = None
    head.zero_grad()
    ref = smoothed_loss_sum(head(hidden), labels, 0.1, shift=True)
    ref.backward()
    assert_close_rel(got.detach(), ref.detach())
    for a, b in zip(g, [hidden.grad, head.weight.grad], strict=True):
        assert_close_rel(a, b)


def test_no_grad_gives_the_loss_only():
    model = tiny_llama(False)
    batch = padded_batch()
    with torch.no_grad():
        plain = model(**batch).loss
        chunked = chunked_causal_lm_loss(model, dict(batch), None, chunk_size=8)
    assert chunked is not None and not chunked.requires_grad
    assert_close_rel(chunked, plain)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        optim="adamw_torch",
        # Adam turns rounding noise on zero-gradient entries into lr-sized steps with eps=1e-8; see
        # tests/strategy/worker.py: a larger eps keeps the comparison about the real gradients.
        adam_epsilon=1e-6,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def count_chunked_calls(monkeypatch) -> list[int]:
    """Counts the chunked loss's calls, so a test sees that the trainer took the chunked path."""
    import ember.engine.chunked_loss as module

    calls: list[int] = []
    real = module.linear_cross_entropy

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "linear_cross_entropy", counted)
    return calls


def _train(tmp_path, model, **kw):
    trainer = Trainer(
        model, _args(tmp_path, **kw), train_dataset=lm_examples(16, vocab=VOCAB), data_collator=pad_lm_batch
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-untied"])
def test_trainer_with_gradient_accumulation_equals_the_plain_loss(tmp_path, name, monkeypatch):
    plain, plain_losses = _train(tmp_path / "plain", MODELS[name]())
    calls = count_chunked_calls(monkeypatch)
    chunked, chunked_losses = _train(
        tmp_path / "chunked", MODELS[name](), chunked_loss=True, loss_chunk_size=8
    )
    assert len(plain_losses) == 4
    assert len(calls) == 8  # 4 steps x GA 2
    assert chunked_losses == pytest.approx(plain_losses, rel=1e-5)
    assert max_param_diff(params_of(chunked.model), params_of(plain.model)) < 1e-5


def test_trainer_label_smoothing_takes_the_chunked_path_and_matches(tmp_path, monkeypatch):
    plain, plain_losses = _train(tmp_path / "plain", gpt2(True), label_smoothing_factor=0.1)
    calls = count_chunked_calls(monkeypatch)
    chunked, chunked_losses = _train(
        tmp_path / "chunked", gpt2(True), label_smoothing_factor=0.1, chunked_loss=True, loss_chunk_size=8
    )
    assert chunked_losses == pytest.approx(plain_losses, rel=1e-5)
    assert max_param_diff(params_of(chunked.model), params_of(plain.model)) < 1e-5
    assert len(calls) == 8


def test_evaluation_and_prediction_keep_the_logits(tmp_path, monkeypatch):
    examples = lm_examples(6, vocab=VOCAB, seed=3)
    trainer = Trainer(
        gpt2(True),
        _args(tmp_path, chunked_loss=True, per_device_eval_batch_size=3),
        train_dataset=lm_examples(8, vocab=VOCAB),
        eval_dataset=examples,
        data_collator=pad_lm_batch,
    )
    calls = count_chunked_calls(monkeypatch)
    out = trainer.predict(examples)
    assert not calls
    assert out.predictions.shape[-1] == VOCAB
    assert out.metrics["test_loss"] > 0


def test_fallbacks_name_their_reason(caplog):
    assert why_not(gpt2(True)) is None
    assert "not a causal LM" in (why_not(RegressionModel()) or "")
    capped = tiny_llama(False)
    capped.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in (why_not(capped) or "")
    odd_head = gpt2(False)
    odd_head.lm_head = nn.Sequential(nn.Linear(32, VOCAB))
    assert "not a plain nn.Linear" in (why_not(odd_head) or "")
    # a notice once, then the caller runs the plain loss
    _NOTICED.clear()
    with caplog.at_level(logging.WARNING, logger="ember"):
        assert chunked_causal_lm_loss(capped, padded_batch(), None, 8) is None
        assert chunked_causal_lm_loss(capped, padded_batch(), None, 8) is None
    notes = [r for r in caplog.records if "chunked_loss" in r.getMessage()]
    assert len(notes) == 1 and "final_logit_softcapping" in notes[0].getMessage()


def test_compute_loss_func_falls_back_with_a_notice(tmp_path, caplog):
    calls = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        calls.append(outputs.logits.shape)
        return smoothed_loss_sum(outputs.logits, labels, 0.0, True) / num_items_in_batch

    _NOTICED.clear()
    trainer = Trainer(
        gpt2(True),
        _args(tmp_path, chunked_loss=True, max_steps=1),
        train_dataset=lm_examples(8, vocab=VOCAB),
        data_collator=pad_lm_batch,
        compute_loss_func=loss_func,
    )
    with caplog.at_level(logging.WARNING, logger="ember"):
        trainer.train()
    assert calls and calls[0][-1] == VOCAB
    assert any("compute_loss_func" in r.getMessage() for r in caplog.records)


def test_loss_chunk_size_is_validated(tmp_path):
    with pytest.raises(ValueError, match="loss_chunk_size"):
        TrainingArguments(output_dir=str(tmp_path), loss_chunk_size=0)


def test_peft_lora_model_takes_the_chunked_path_with_equal_gradients():
    from peft import LoraConfig, get_peft_model

    def lora():
        return get_peft_model(tiny_llama(False), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    batch = padded_batch()
    plain_model, chunked_model = lora(), lora()
    chunked_model.load_state_dict(plain_model.state_dict())
    plain = plain_model(**batch).loss
    plain.backward()
    assert why_not(chunked_model) is None
    chunked = chunked_causal_lm_loss(chunked_model, dict(batch), None, chunk_size=9)
    assert chunked is not None
    chunked.backward()
    assert_close_rel(chunked.detach(), plain.detach())
    ref, got = grads(plain_model), grads(chunked_model)
    assert ref.keys() == got.keys() and all("lora" in k for k in ref)
    for key in ref:
        assert_close_rel(got[key], ref[key])


def test_a_second_backward_is_a_clear_error():
    hidden = torch.randn(6, 16, requires_grad=True)
    head = nn.Linear(16, VOCAB, bias=False)
    loss = linear_cross_entropy(hidden, head.weight, None, torch.randint(0, VOCAB, (6,)), chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_a_model_whose_loss_is_not_the_heads_falls_back_after_the_sample_check(tmp_path, caplog, monkeypatch):
    from transformers import GPT2LMHeadModel

    class ScaledLMHeadModel(GPT2LMHeadModel):  # a logit multiplier no config field announces
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            out.logits = out.logits * 2.0
            if labels is not None:
                out.loss = self.loss_function(out.logits, labels, vocab_size=self.config.vocab_size)
            return out

    def scaled():
        torch.manual_seed(0)
        return ScaledLMHeadModel(gpt2(True).config)

    assert why_not(scaled()) is None
    _NOTICED.clear()
    calls = count_chunked_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ember"):
        chunked, chunked_losses = _train(tmp_path / "c", scaled(), chunked_loss=True, loss_chunk_size=8)
    assert any("differs from loss(head(hidden states))" in r.getMessage() for r in caplog.records)
    assert not calls  # training ran the plain loss
    plain, plain_losses = _train(tmp_path / "p", scaled())
    assert chunked_losses == plain_losses


def test_the_sample_check_passes_for_the_supported_models():
    from ember.engine.chunked_loss import _VERIFIED

    for make in MODELS.values():
        model = make()
        assert chunked_causal_lm_loss(model, padded_batch(), None, chunk_size=8) is not None
        assert _VERIFIED[model] is True


def test_by_default_micro_batches_of_more_than_one_chunk_are_chunked(tmp_path, monkeypatch):
    plain, plain_losses = _train(tmp_path / "plain", gpt2(True), chunked_loss=False, loss_chunk_size=4)
    calls = count_chunked_calls(monkeypatch)
    _, small = _train(tmp_path / "one-chunk", gpt2(True), loss_chunk_size=10_000)
    assert calls == [] and small == plain_losses  # within one chunk: the plain path, bit for bit
    default, losses = _train(tmp_path / "default", gpt2(True), loss_chunk_size=4)
    assert len(calls) == 8  # 4 steps x GA 2; every micro-batch (2 rows of >= 3 tokens) has > 4 labels
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert max_param_diff(params_of(default.model), params_of(plain.model)) < 1e-5


def test_by_default_a_model_it_cannot_serve_falls_back_quietly(tmp_path, monkeypatch, caplog):
    calls = count_chunked_calls(monkeypatch)
    _NOTICED.clear()
    capped = tiny_llama(False)
    capped.config.final_logit_softcapping = 30.0
    used = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        used.append(1)
        return smoothed_loss_sum(outputs.logits, labels, 0.0, True) / num_items_in_batch

    with caplog.at_level(logging.WARNING, logger="ember"):
        _, losses = _train(tmp_path / "capped", capped, loss_chunk_size=1)
        Trainer(
            gpt2(True),
            _args(tmp_path / "func", loss_chunk_size=1, max_steps=1),
            train_dataset=lm_examples(8, vocab=VOCAB),
            data_collator=pad_lm_batch,
            compute_loss_func=loss_func,
        ).train()
    assert calls == [] and len(losses) == 4 and len(used) == 2
    assert not [r for r in caplog.records if "chunked" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="ember"):
        _train(tmp_path / "asked", capped, loss_chunk_size=1, chunked_loss=True, max_steps=1)
    assert [r for r in caplog.records if "final_logit_softcapping" in r.getMessage()]
