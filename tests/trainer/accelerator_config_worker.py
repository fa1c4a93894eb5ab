"""Rank script of tests/trainer/test_accelerator_config_runs.py: accelerator_config's split_batches,
even_batches=False and sync_each_batch on 2 processes. Rank 0 writes weights, losses, metrics and
predictions under OUT; the test compares them with one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ember import TrainerCallback
from tests.helpers import lm_examples
from tests.strategy.worker import LM_EVAL, RANK, lm_state, lm_trainer, losses, write


def _outputs(out: Path, name: str, trainer: Any, extra: dict[str, Any] | None = None) -> None:
    metrics = trainer.evaluate()
    pred = trainer.predict(lm_examples(LM_EVAL, seed=2))
    state = lm_state(trainer)
    state["predictions"] = torch.from_numpy(pred.predictions).float()
    state["label_ids"] = torch.from_numpy(pred.label_ids)
    meta = {"losses": losses(trainer), "eval": metrics, **(extra or {})}
    write(out, name, state, meta)


def _refusal(**kw: Any) -> str:
    try:
        trainer = lm_trainer("/tmp/unused-accelerator-config", **kw)
        trainer.train()
    except ValueError as error:
        return str(error)
    return "no error"


class GradsAgree(TrainerCallback):
    """After each micro-batch but the last of a step: are the ranks' gradients already the same?"""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.agree: list[bool] = []

    def on_substep_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        grad = next(p.grad for p in self.trainer.model.parameters() if p.grad is not None).detach()
        parts = [torch.empty_like(grad) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, grad.contiguous())
        self.agree.append(all(torch.equal(parts[0], p) for p in parts[1:]))


def split(out: Path) -> None:
    config = {"split_batches": True}
    sizes = {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 4}
    trainer = lm_trainer(str(out / "split"), accelerator_config=config, **sizes)
    trainer.train()
    total = trainer.get_total_train_batch_size(trainer.args)
    refused = _refusal(per_device_train_batch_size=3, accelerator_config=config)
    _outputs(out, "split", trainer, {"total_batch": total, "refused": refused})


def uneven(out: Path) -> None:
    config = {"even_batches": False}
    trainer = lm_trainer(str(out / "uneven"), max_steps=-1, num_train_epochs=1, accelerator_config=config)
    trainer.train_dataset = lm_examples(23, seed=1)  # rank 0: 12 samples, rank 1: 11
    trainer.train()
    # One eval batch in all: rank 1 has none, and learns the outputs' shapes from rank 0.
    single = trainer.predict(lm_examples(1, seed=3))
    extra = {
        "steps": trainer.state.global_step,
        "single_rows": int(single.label_ids.shape[0]),
        "single_loss": single.metrics["test_loss"],
    }
    _outputs(out, "uneven", trainer, extra)
    small = lm_trainer(
        str(out / "uneven-refused"),
        max_steps=-1,
        num_train_epochs=1,
        gradient_accumulation_steps=1,
        accelerator_config=config,
    )
    small.train_dataset = lm_examples(21, seed=1)  # rank 0: 6 batches, rank 1: 5
    try:
        small.train()
        message = "no error"
    except ValueError as error:
        message = str(error)
    # Python objects from a custom prediction_step: 7 rows in batches of 2 is 2 batches on rank 0 and
    # 2 on rank 1, the last one of a single row; gathered as objects, rank 1's turn without rows is [].
    from ember import TrainingArguments
    from tests.engine.test_eval_outputs import WordPredictions
    from tests.helpers import RegressionDataset, RegressionModel

    def words(n: int) -> list[str]:
        args = TrainingArguments(
            output_dir=str(out / "words"),
            report_to="none",
            use_cpu=True,
            per_device_eval_batch_size=2,
            eval_use_gather_object=True,
            accelerator_config=config,
        )
        trainer = WordPredictions(model=RegressionModel(), args=args)
        return list(trainer.predict(RegressionDataset(n)).predictions)

    if RANK == 0:
        (out / "uneven-refused.json").write_text(json.dumps({"message": message}))
    found: dict[str, Any] = {"words7": words(7), "words5": words(5)}
    # FSDP: every forward gathers the shards, so rank 1 re-runs its last batch while rank 0 runs its 4th.
    sharded = lm_trainer(str(out / "uneven-fsdp"), fsdp=True, accelerator_config=config)
    found["fsdp_eval"] = sharded.evaluate()
    try:
        sharded.predict(lm_examples(1, seed=3))
        found["fsdp_one"] = "no error"
    except ValueError as error:
        found["fsdp_one"] = str(error)
    if RANK == 0:
        (out / "uneven-words.json").write_text(json.dumps(found))


def sync_each(out: Path) -> None:
    agree = {}
    for name, kwargs in (("sync-each", {"sync_each_batch": True}), ("no-sync", None)):
        watch = GradsAgree()
        config = {"gradient_accumulation_kwargs": kwargs}
        trainer = lm_trainer(str(out / name), callbacks=[watch], accelerator_config=config)
        watch.trainer = trainer
        trainer.train()
        agree[name] = watch.agree
        if name == "sync-each":
            write(out, name, lm_state(trainer), {"losses": losses(trainer)})
    if RANK == 0:
        (out / "agree.json").write_text(json.dumps(agree))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    for scenario in sys.argv[2:]:
        {"split": split, "uneven": uneven, "sync_each": sync_each}[scenario](target)
