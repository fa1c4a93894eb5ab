"""accelerator_config's keys in ember's own data and step code, each against its meaning in
transformers: split_batches, even_batches=False and sync_each_batch on 2 gloo processes compared with
one process; use_seedable_sampler and non_blocking on one."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ember import Trainer, TrainerCallback, TrainingArguments
from tests.helpers import RegressionDataset, RegressionModel, lm_examples
from tests.strategy import launch

WORKER = "tests.trainer.accelerator_config_worker"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = [k for k in a if k.startswith("param.")]
    assert keys and set(keys) == {k for k in b if k.startswith("param.")}
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def _single(tmp_path: Path, name: str, **kw: Any) -> dict[str, Any]:
    """One process: the run two ranks must reproduce."""
    from tests.strategy.worker import LM_EVAL, lm_state, lm_trainer, losses

    train = kw.pop("train", None)
    trainer = lm_trainer(str(tmp_path / name), **kw)
    if train is not None:
        trainer.train_dataset = train
    trainer.train()
    metrics = trainer.evaluate()
    pred = trainer.predict(lm_examples(LM_EVAL, seed=2))
    state = lm_state(trainer)
    state["predictions"] = torch.from_numpy(pred.predictions).float()
    state["label_ids"] = torch.from_numpy(pred.label_ids)
    return {"state": state, "losses": losses(trainer), "eval": metrics, "trainer": trainer}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("accelerator-config")
    launch.check(launch.run(["-m", WORKER, str(out), "split", "uneven", "sync_each"], nproc=2, timeout=300))
    return out


def _rank0(out: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(out / f"{name}.safetensors")), json.loads((out / f"{name}.json").read_text())


def test_split_batches_two_ranks_share_the_per_device_batch_as_one_process(two_ranks, tmp_path):
    # Evaluation: each rank evaluates 2 of every 4 samples; as the loss of a batch is its token mean
    # (weighted by samples, as transformers), the one-process equal evaluates batches of 2.
    ref = _single(tmp_path, "split", per_device_train_batch_size=4, per_device_eval_batch_size=2)
    state, meta = _rank0(two_ranks, "split")
    # Each rank loaded 2 of the 4; the step is the 4-sample batch of one process.
    assert meta["total_batch"] == 4 * 2  # per_device x accumulation, not x ranks
    assert _max_diff(ref["state"], state) < 1e-5
    assert meta["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert meta["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], rel=1e-5)
    assert torch.equal(state["label_ids"], ref["state"]["label_ids"])
    assert torch.allclose(state["predictions"], ref["state"]["predictions"], atol=1e-4)
    assert "split_batches" in meta["refused"] and "per_device_train_batch_size`=3" in meta["refused"]


def test_even_batches_false_trains_and_evaluates_without_copies(two_ranks, tmp_path):
    # 23 samples: rank 1 has one fewer, and its last micro-batch holds one sample. One process with
    # the 4-sample batch trains on exactly the same steps (no wrapped-around copy on rank 1).
    ref = _single(
        tmp_path,
        "uneven",
        per_device_train_batch_size=4,
        max_steps=-1,
        num_train_epochs=1,
        train=lm_examples(23, seed=1),
    )
    state, meta = _rank0(two_ranks, "uneven")
    assert meta["steps"] == ref["trainer"].state.global_step == 3
    assert _max_diff(ref["state"], state) < 1e-5
    assert meta["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    # Evaluation: 13 samples in batches of 2 is 4 batches on rank 0 and 3 on rank 1; exactly the
    # single-process metrics and predictions, in dataset order, with no duplicate rows.
    assert meta["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], rel=1e-6)
    assert meta["eval"]["eval_accuracy"] == ref["eval"]["eval_accuracy"]
    assert meta["eval"]["eval_rows"] == 13.0
    assert torch.equal(state["label_ids"], ref["state"]["label_ids"])
    assert torch.allclose(state["predictions"], ref["state"]["predictions"], atol=1e-5)
    # A set of one batch: rank 1 has nothing at all and still joins the gathers.
    assert meta["single_rows"] == 1
    single = ref["trainer"].predict(lm_examples(1, seed=3))
    assert meta["single_loss"] == pytest.approx(single.metrics["test_loss"], rel=1e-6)
    refused = json.loads((two_ranks / "uneven-refused.json").read_text())["message"]
    assert "even_batches" in refused and "rank 0 6" in refused and "rank 1 5" in refused
    # Python objects gathered as objects: every row once, in dataset order.
    words = json.loads((two_ranks / "uneven-words.json").read_text())
    for n in (7, 5):
        assert words[f"words{n}"] == [f"x={float(x):.3f}" for x in RegressionDataset(n).x]
    # FSDP (untrained model on both sides): the same metrics; one batch for two ranks is refused.
    from tests.strategy.worker import lm_trainer

    untrained = lm_trainer(str(tmp_path / "untrained")).evaluate()
    assert words["fsdp_eval"]["eval_loss"] == pytest.approx(untrained["eval_loss"], rel=1e-5)
    assert words["fsdp_eval"]["eval_rows"] == 13.0
    assert "no evaluation batch at all" in words["fsdp_one"]


def test_sync_each_batch_reduces_every_micro_batch_and_keeps_the_result(two_ranks, tmp_path):
    agree = json.loads((two_ranks / "agree.json").read_text())
    # 5 steps of 2 micro-batches: after the first one the gradients are already the ranks' average
    # with sync_each_batch, and still each rank's own without it (DDP's no_sync).
    assert agree["sync-each"] == [True] * 5
    assert agree["no-sync"] == [False] * 5
    ref = _single(tmp_path, "sync", per_device_train_batch_size=4)
    state, meta = _rank0(two_ranks, "sync-each")
    assert _max_diff(ref["state"], state) < 1e-5
    assert meta["losses"] == pytest.approx(ref["losses"], rel=1e-5)


# -- one process ----------------------------------------------------------------------------------------


def _regression(tmp_path: Path, **kw: Any) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        logging_steps=1,
        seed=3,
        **kw,
    )
    torch.manual_seed(0)
    return Trainer(model=RegressionModel(), args=args, train_dataset=RegressionDataset(32))


class OrderSeen:
    def __init__(self) -> None:
        self.rows: list[list[float]] = []

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        x = torch.stack([f["input_x"] for f in features])
        self.rows.append(x.tolist())
        return {"input_x": x, "labels": torch.stack([f["labels"] for f in features])}


def test_use_seedable_sampler_false_draws_the_order_from_the_global_rng(tmp_path):
    def order(seedable: bool, global_seed: int) -> list[list[float]]:
        trainer = _regression(
            tmp_path / f"{seedable}{global_seed}",
            max_steps=8,
            accelerator_config={"use_seedable_sampler": seedable},
        )
        seen = OrderSeen()
        trainer.data_collator = seen
        torch.manual_seed(global_seed)  # after the Trainer seeded: only the global stream differs
        trainer.train()
        return seen.rows

    seeded_a, seeded_b = order(True, 1), order(True, 2)
    drawn_a, drawn_b = order(False, 1), order(False, 2)
    assert seeded_a == seeded_b  # ember's sampler: a function of (data seed, epoch) alone
    assert drawn_a != drawn_b and drawn_a != seeded_a  # drawn from torch's global RNG
    # What torch's own RandomSampler draws from the same global state: one int64 seeds the shuffle.
    torch.manual_seed(1)
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    first = torch.randperm(32, generator=torch.Generator().manual_seed(seed))[:4].tolist()
    assert drawn_a[0] == [RegressionDataset(32).x[i].item() for i in first]


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 5:
            raise KeyboardInterrupt  # a killed run: checkpoint-5 is on disk, nothing after it


def test_use_seedable_sampler_false_still_resumes_exactly(tmp_path):
    def run(out: Path, resume: bool, stop: bool = False) -> dict[str, torch.Tensor]:
        trainer = _regression(
            out,
            max_steps=12,
            save_strategy="steps",
            save_steps=5,
            accelerator_config={"use_seedable_sampler": False},
        )
        if stop:
            trainer.add_callback(StopAfterSave())
        trainer.train(resume_from_checkpoint=resume or None)
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    straight = run(tmp_path / "straight", False)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", False, stop=True)  # mid-epoch 0 (8 steps an epoch)
    resumed = run(tmp_path / "resumed", True)  # the epoch's drawn order comes back from the checkpoint
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


class CopyKwargs(torch.Tensor):
    """A tensor that records the keyword arguments of each `.to()` made on it."""

    seen: list[dict[str, Any]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.to:
            cls.seen.append(dict(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("non_blocking", [False, True])
def test_non_blocking_reaches_the_batch_copy(tmp_path, non_blocking):
    trainer = _regression(tmp_path, max_steps=1, accelerator_config={"non_blocking": non_blocking})
    CopyKwargs.seen = []
    trainer._prepare_inputs({"input_x": torch.zeros(2).as_subclass(CopyKwargs)})
    assert CopyKwargs.seen and all(k.get("non_blocking") is non_blocking for k in CopyKwargs.seen)


def test_non_blocking_without_pinned_memory_warns_as_transformers(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ember"):
        _regression(tmp_path, accelerator_config={"non_blocking": True}, dataloader_pin_memory=False)
    assert any("dataloader_pin_memory" in r.getMessage() for r in caplog.records)
