"""The model pipeline: activation checkpointing (transformers models, plain modules, PEFT) gives the
same losses and gradients as without, with fewer saved activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember import Trainer, TrainingArguments
from ember.models.pipeline import enable_activation_checkpointing, prepare_model
from tests.helpers import lm_examples, pad_lm_batch, tiny_gpt2


def _args(out, **overrides) -> TrainingArguments:
    kw: dict = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        optim="adamw_torch",
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _train(out, model: nn.Module, **overrides) -> tuple[list[float], dict[str, torch.Tensor]]:
    trainer = Trainer(
        model, _args(out, **overrides), train_dataset=lm_examples(32), data_collator=pad_lm_batch
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {k: p.detach().clone() for k, p in trainer.model.named_parameters()}


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during one training forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return total


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_transformers_model_same_losses_and_weights_with_checkpointing(tmp_path, monkeypatch, kwargs):
    import transformers.modeling_utils as mu

    seen: list[dict] = []
    real = mu.checkpoint

    def recording(fn, *args, **kw):
        seen.append({k: v for k, v in kw.items() if k == "use_reentrant"})
        return real(fn, *args, **kw)

    monkeypatch.setattr(mu, "checkpoint", recording)
    plain_losses, plain = _train(tmp_path / "a", tiny_gpt2(0))
    assert not seen
    ac_losses, ac = _train(
        tmp_path / "b", tiny_gpt2(0), gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs
    )
    assert seen and all(s == {"use_reentrant": bool(kwargs)} for s in seen)
    assert plain_losses == pytest.approx(ac_losses, rel=1e-6)
    _assert_close(plain, ac)


def test_checkpointing_stores_fewer_activations_on_gpt2():
    batch = pad_lm_batch(lm_examples(8, min_len=16, max_len=16))
    without = saved_activation_bytes(tiny_gpt2(0), batch)
    model = tiny_gpt2(0)
    prepare_model(model, TrainingArguments(activation_checkpointing=True, use_cpu=True, report_to="none"))
    assert saved_activation_bytes(model, batch) < 0.7 * without


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.down(torch.nn.functional.gelu(self.up(x)))


class Stack(nn.Module):
    """A plain module: embedding, a ModuleList of blocks, a head; returns (loss,) with labels."""

    def __init__(self, vocab: int = 97, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, scale=0.5)
        logits = self.head(h)
        if labels is None:
            return (logits,)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        return (loss, logits)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"every_n_layers": 2}])
def test_plain_module_blocks_are_checkpointed_with_same_results(tmp_path, kwargs):
    batch = pad_lm_batch(lm_examples(8, min_len=16, max_len=16))
    model = Stack()
    names = [k for k, _ in model.named_parameters()]
    without = saved_activation_bytes(model, batch)
    enable_activation_checkpointing(model, kwargs)
    enable_activation_checkpointing(model, kwargs)  # idempotent
    assert [k for k, _ in model.named_parameters()] == names  # no wrapper in the names
    assert saved_activation_bytes(model, batch) < without
    plain_losses, plain = _train(tmp_path / "a", Stack())
    ac_losses, ac = _train(
        tmp_path / "b", Stack(), activation_checkpointing=True, activation_checkpointing_kwargs=kwargs
    )
    assert plain_losses == pytest.approx(ac_losses, rel=1e-6)
    _assert_close(plain, ac)


def test_module_without_blocks_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="no repeated blocks"):
        enable_activation_checkpointing(nn.Linear(2, 2))


@pytest.mark.parametrize("reentrant", [False, True])
def test_lora_with_checkpointing_trains_like_without(tmp_path, reentrant):
    from peft import LoraConfig, get_peft_model

    def lora():
        return get_peft_model(tiny_gpt2(0), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))

    plain_losses, plain = _train(tmp_path / "a", lora())
    ac_losses, ac = _train(
        tmp_path / "b",
        lora(),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    assert plain_losses == pytest.approx(ac_losses, rel=1e-6)
    _assert_close(plain, ac)
    start = dict(lora().named_parameters())
    moved = [k for k in ac if "lora_" in k and not torch.equal(ac[k], start[k])]
    assert moved, "the LoRA weights got no gradient under checkpointing"


def test_arguments_resolve_aliases_and_check_kwargs():
    old = TrainingArguments(
        gradient_checkpointing=True, gradient_checkpointing_kwargs='{"use_reentrant": true}'
    )
    assert old.activation_checkpointing is True and old.activation_checkpointing_kwargs == {
        "use_reentrant": True
    }
    new = TrainingArguments(activation_checkpointing=True)
    assert new.gradient_checkpointing is True
    assert TrainingArguments().activation_checkpointing is False
    with pytest.raises(ValueError, match="activation_checkpointing_kwargs.*unknown keys.*use_reentrnt"):
        TrainingArguments(
            activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrnt": False}
        )
    with pytest.raises(ValueError, match="every_n_layers"):
        TrainingArguments(
            activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 0}
        )
