"""Tiny models and datasets for the tests: built from configs, no downloads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


class RegressionDataset(Dataset[dict[str, torch.Tensor]]):
    """y = 2x + 3 + noise, fixed by `seed`."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, generator=g)
        self.y = 2.0 * self.x + 3.0 + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_x": self.x[i], "labels": self.y[i]}


class RegressionModel(nn.Module):
    """A linear model with a hidden layer and dropout, returning (loss, prediction) like HF models."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = nn.Linear(1, 8)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(8, 1)

    def forward(self, input_x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        pred = self.out(self.drop(torch.tanh(self.hidden(input_x.unsqueeze(-1))))).squeeze(-1)
        if labels is None:
            return (pred,)
        return (nn.functional.mse_loss(pred, labels), pred)


def tiny_gpt2(seed: int = 0, vocab: int = 97, n_positions: int = 64) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0, vocab: int = 97, tied: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def lm_examples(
    n: int = 16, vocab: int = 97, seed: int = 0, min_len: int = 3, max_len: int = 20
) -> list[dict[str, list[int]]]:
    """Variable-length token sequences, as a tokenizer would produce them (labels = input_ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def pad_lm_batch(features: list[dict[str, list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels padded with -100, attention_mask 0 on padding."""
    longest = max(len(f["input_ids"]) for f in features)
    ids, mask, labels = [], [], []
    for f in features:
        pad = longest - len(f["input_ids"])
        ids.append(f["input_ids"] + [pad_id] * pad)
        mask.append([1] * len(f["input_ids"]) + [0] * pad)
        labels.append(f["labels"] + [-100] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def args_with(**fields: Any) -> Any:
    """Real `TrainingArguments` (defaults, types) with `fields` set after validation: for testing
    how a part treats values or combinations that validation would refuse before it runs."""
    from ember import TrainingArguments

    args = TrainingArguments(output_dir="unused")
    for name, value in fields.items():
        if not hasattr(args, name):
            raise AttributeError(f"TrainingArguments has no field {name!r}")
        setattr(args, name, value)
    return args
