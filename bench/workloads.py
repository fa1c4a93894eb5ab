"""The benchmark jobs: model sizes, data, collator and metrics shared by all three implementations.

Nothing heavy is imported at module level: the parent process (`bench.compare`) reads the
`Workload` table without paying for torch or transformers; the child imports them lazily, after
it has timed the library import.

Data: fixed-length sequences of byte-level tokens (vocab 256) from a seeded random walk, so the
loss has something to learn and every implementation sees the same tensors. All implementations
read the dataset in index order (sequential sampling: `train_sampling_strategy="sequential"` for the
trainers, `shuffle=False` for the raw loop); the dataset itself is drawn at random, so the order
is as random as a shuffled one and identical across implementations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VOCAB = 256
DATA_SEED = 1234
MODEL_SEED = 0


@dataclass(frozen=True)
class Workload:
    """One job. `steps` are optimizer steps; each sees `batch * grad_accum` sequences of `seq` tokens.

    `eval_samples > 0` makes it an evaluation job (no training): `evaluate()` over that many samples.
    """

    name: str
    title: str
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 2
    seq: int = 128
    batch: int = 8
    steps: int = 200
    grad_accum: int = 1
    logging_steps: int = 10
    save_steps: int = 0
    eval_samples: int = 0
    eval_batch: int = 16
    vocab: int = VOCAB
    lr: float = 3e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    @property
    def is_eval(self) -> bool:
        return self.eval_samples > 0

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 10)

    @property
    def train_samples(self) -> int:
        return self.steps * self.batch * self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.grad_accum * self.seq

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        return cls(**d)


WORKLOADS: dict[str, Workload] = {
    "a": Workload("a", "tiny GPT-2 (2x128, seq 128, batch 8): loop overhead shows most", steps=200),
    "b": Workload(
        "b", "GPT-2 6x256 (seq 128, batch 8): compute dominates", n_layer=6, n_embd=256, n_head=4, steps=60
    ),
    "c": Workload("c", "tiny GPT-2, gradient accumulation 4", steps=50, grad_accum=4, logging_steps=5),
    "d": Workload("d", "tiny GPT-2, checkpoint every 50 steps", steps=200, save_steps=50),
    "e": Workload(
        "e",
        "tiny GPT-2, evaluate 5,000 samples (streaming metrics vs accumulated logits)",
        eval_samples=5000,
        eval_batch=16,
    ),
    # GPU only (bench/gpu.sh): GPT-2 124M shape from its config, no download.
    "g": Workload(
        "g",
        "GPT-2 124M (12x768, seq 1024, vocab 50257), bf16",
        n_layer=12,
        n_embd=768,
        n_head=12,
        seq=1024,
        batch=16,
        steps=40,
        vocab=50257,
        lr=6e-4,
        weight_decay=0.1,
        logging_steps=10,
    ),
}

CPU_WORKLOADS = ("a", "b", "c", "d", "e")


def smoke(w: Workload) -> Workload:
    """A tiny version of `w` that still exercises every path (logging, saving, accumulation)."""
    return dataclasses.replace(
        w,
        n_layer=1,
        n_embd=32,
        n_head=2,
        seq=32,
        batch=4,
        steps=4,
        logging_steps=2,
        save_steps=2 if w.save_steps else 0,
        eval_samples=48 if w.eval_samples else 0,
        eval_batch=8,
        vocab=min(w.vocab, VOCAB),
    )


def with_steps(w: Workload, steps: int) -> Workload:
    """`w` with another step count; logging/saving cadences are kept (capped at the step count)."""
    return dataclasses.replace(
        w,
        steps=steps,
        logging_steps=min(w.logging_steps, steps),
        save_steps=min(w.save_steps, steps) if w.save_steps else 0,
    )


# -- built in the child only (imports torch / transformers) ----------------------------------------


def build_model(w: Workload, seed: int = MODEL_SEED) -> Any:
    """GPT2LMHeadModel from a config; same seed, same weights in every implementation.

    Dropout is off so that the three implementations can be checked to compute the same losses
    (their RNG streams differ); `use_cache=False` because nobody trains with a KV cache.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=w.vocab,
        n_positions=w.seq,
        n_embd=w.n_embd,
        n_layer=w.n_layer,
        n_head=w.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def make_dataset(w: Workload, num_samples: int, seed: int = DATA_SEED) -> list[dict[str, Any]]:
    """`num_samples` dicts of int64 `input_ids`/`labels` (labels = inputs; the model shifts them).

    Tokens follow a random walk mod vocab (steps in [-3, 3]), so a model can learn something.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, w.vocab, (num_samples, 1), generator=g)
    steps = torch.randint(-3, 4, (num_samples, w.seq - 1), generator=g)
    ids = torch.cat([start, start + steps.cumsum(dim=1)], dim=1).remainder(w.vocab)
    return [{"input_ids": row, "labels": row} for row in ids]


def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
    """The one collator all three implementations use: stack each key's tensors."""
    import torch

    return {key: torch.stack([f[key] for f in features]) for key in features[0]}


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


def token_hits(logits: Any, labels: Any) -> tuple[int, int]:
    """(correct next-token predictions, targets) of a batch; labels are shifted as the model does."""
    import torch

    logits, labels = torch.as_tensor(_first(logits)), torch.as_tensor(_first(labels))
    pred = logits[:, :-1].argmax(dim=-1)
    target = labels[:, 1:].to(pred.device)
    mask = target != -100
    return int(((pred == target) & mask).sum()), int(mask.sum())


class StreamingAccuracy:
    """`compute_metrics` for `batch_eval_metrics=True`: counts per batch, reports on the last one."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def __call__(self, pred: Any, compute_result: bool = False) -> dict[str, float]:
        correct, total = token_hits(pred.predictions, pred.label_ids)
        self.correct += correct
        self.total += total
        if not compute_result:
            return {}
        result = {"accuracy": self.correct / max(self.total, 1)}
        self.correct = self.total = 0
        return result


def full_accuracy(pred: Any) -> dict[str, float]:
    """`compute_metrics` over all logits at once (the accumulate-then-compute path)."""
    correct, total = token_hits(pred.predictions, pred.label_ids)
    return {"accuracy": correct / max(total, 1)}
