"""torch_compile: one deliberately tiny test, because a cold inductor compile costs tens of seconds on
CPU. The compiled run gives eager's losses (fp32 tolerance) and saves the original names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ember import Trainer, TrainingArguments


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 31, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        logits = self.head(h)
        if labels is None:
            return (logits,)
        # A mean over this batch's targets; the Trainer rescales it to the step's token count.
        return (
            nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100),
            logits,
        )


def _rows(n: int = 24, seq: int = 8, vocab: int = 31) -> list[dict[str, torch.Tensor]]:
    # Fixed length and -100 holes in the labels: the loss is normalised by real target tokens.
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, 4, (1,), generator=g))] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _run(out, **compile_args):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=1,
        save_steps=4,
        learning_rate=0.05,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        optim="adamw_torch",
        **compile_args,
    )
    trainer = Trainer(TinyLM(), args, train_dataset=_rows())
    trainer.train()
    return trainer


# Slow by nature: a cold inductor compile of a 2-layer model (~20-40 s on CPU).
def test_compiled_training_matches_eager_and_saves_original_names(tmp_path):
    eager = _run(tmp_path / "eager")
    compiled = _run(tmp_path / "compiled", torch_compile_backend="inductor")
    assert compiled.args.torch_compile is True  # naming a backend turns compilation on
    assert getattr(compiled.model, "_compiled_call_impl", None) is not None
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    names = {k for k, _ in TinyLM().named_parameters()}
    saved = load_file(str(tmp_path / "compiled" / "checkpoint-4" / "model.safetensors"))
    assert set(saved) == names
    compiled.save_model(str(tmp_path / "final"))
    assert set(load_file(str(tmp_path / "final" / "model.safetensors"))) == names
    for k, p in eager.model.named_parameters():
        torch.testing.assert_close(dict(compiled.model.named_parameters())[k], p, rtol=1e-4, atol=1e-5)


def test_compile_arguments_are_checked():
    with pytest.raises(ValueError, match="torch_compile_mode.*max-autotune"):
        TrainingArguments(torch_compile_mode="fastest")
    with pytest.raises(ValueError, match="torch_compile_backend.*inductor"):
        TrainingArguments(torch_compile_backend="inductr")
    assert TrainingArguments(torch_compile_mode="default").torch_compile is True
