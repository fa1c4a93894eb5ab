"""auto_find_batch_size: an out-of-memory step is retried with half-size micro-batches; the run equals
one that used the small micro-batch from the start, and the global batch's maths is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.engine.micro_batches import is_out_of_memory, split_batch


class MemoryBound(nn.Module):
    """A regression model with dropout whose forward fails like an allocator when the batch is > limit."""

    def __init__(self, limit: int | None, error: str = "cuda") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = nn.Linear(3, 16), nn.Linear(16, 1)
        self.drop = nn.Dropout(0.2)
        self.limit, self.error, self.failures = limit, error, 0

    def forward(self, x, labels=None):
        if self.limit is not None and x.shape[0] > self.limit:
            self.failures += 1
            if self.error == "cuda":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
            )
        pred = self.out(self.drop(torch.relu(self.hidden(x)))).squeeze(-1)
        # A mean over this micro-batch; the Trainer rescales it to the step's sample count.
        return (nn.functional.mse_loss(pred, labels), pred)


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _trainer(out, limit, batch, ga, error="cuda", **overrides) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=2,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        learning_rate=0.05,
        logging_steps=1,
        save_steps=3,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=11,
        optim="adamw_torch",
        **overrides,
    )
    return Trainer(MemoryBound(limit, error), args, train_dataset=Data())


def _losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters()}


def test_oom_run_equals_the_small_micro_batch_run_and_the_big_batch_maths(tmp_path):
    found = _trainer(tmp_path / "found", limit=2, batch=8, ga=2, auto_find_batch_size=True)
    found.train()
    assert found.model.failures == 2  # 8 -> 4 -> 2, once, at the first step
    assert found.state.train_batch_size == 2
    small = _trainer(tmp_path / "small", limit=None, batch=2, ga=8)
    small.train()
    assert _losses(found) == _losses(small)
    for k, p in _params(small).items():
        assert torch.equal(_params(found)[k], p), k
    # Without dropout, the same as the big micro-batch that never ran out of memory (fp32 tolerance).
    no_drop = []
    for name, limit, batch, ga in (("a", 2, 8, 2), ("b", None, 8, 2)):
        t = _trainer(tmp_path / name, limit=limit, batch=batch, ga=ga, auto_find_batch_size=True)
        t.model.drop.p = 0.0
        t.train()
        no_drop.append(t)
    assert _losses(no_drop[0]) == pytest.approx(_losses(no_drop[1]), rel=1e-5)
    assert no_drop[1].model.failures == 0 and no_drop[1].state.train_batch_size == 8


def test_cpu_allocator_error_is_caught_too_and_resume_keeps_the_found_size(tmp_path):
    class Crash(Exception):
        pass

    class CrashAt3(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Crash

    kw = dict(limit=4, batch=8, ga=1, auto_find_batch_size=True, error="cpu")
    reference = _trainer(tmp_path / "ref", **kw)
    reference.train()
    first = _trainer(tmp_path / "run", **kw)
    first.add_callback(CrashAt3())
    with pytest.raises(Crash):
        first.train()
    resumed = _trainer(tmp_path / "run", **kw)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.model.failures == 0  # started with the size stored in the checkpoint
    assert resumed.state.train_batch_size == 4
    assert _losses(resumed) == _losses(reference)
    for k, p in _params(reference).items():
        assert torch.equal(_params(resumed)[k], p), k


def test_without_the_flag_the_error_propagates_and_at_one_sample_it_says_what_to_do(tmp_path):
    with pytest.raises(torch.OutOfMemoryError):
        _trainer(tmp_path / "a", limit=2, batch=8, ga=1).train()
    with pytest.raises(RuntimeError, match="micro-batches of 1 sample"):
        _trainer(tmp_path / "b", limit=0, batch=8, ga=1, auto_find_batch_size=True).train()


def test_split_batch_and_oom_detection():
    batch = {"x": torch.arange(5), "names": list("abcde"), "flag": True}
    pieces = split_batch(batch, 2)
    assert [p["x"].tolist() for p in pieces] == [[0, 1], [2, 3, 4]]
    assert [p["names"] for p in pieces] == [["a", "b"], ["c", "d", "e"]]
    assert all(p["flag"] is True for p in pieces)
    assert len(split_batch(batch, 8)) == 5
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
