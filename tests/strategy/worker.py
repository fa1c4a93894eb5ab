"""What each rank runs in the multi-process tests: `python -m tests.strategy.worker SUITE OUT [opts]`.

A suite runs several scenarios in one process (the process group is shared by every Trainer of a
process), so the cost of starting processes and importing transformers is paid once per suite.
Rank 0 writes results as safetensors/JSON under OUT; the pytest process compares them with
single-process runs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ember import Trainer, TrainerCallback, TrainingArguments
from tests.helpers import RegressionModel, lm_examples, pad_lm_batch, tiny_gpt2
from tests.resume_job import AugmentedData, final_state, job_args

RANK = int(os.environ.get("RANK", "0"))


class Crash(Exception):
    pass


class CrashAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            raise Crash(self.step)


class SignalAt(TrainerCallback):
    """Send `sig` to this process at the start of step `step` (on one rank only)."""

    def __init__(self, step: int, sig: int) -> None:
        self.step, self.sig = step, sig

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.sig)


# -- the language-model job shared with the single-process references in the tests ---------------------

LM_TRAIN = 24
LM_EVAL = 13


def lm_args(out: str, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=out,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=5,
        learning_rate=3e-3,
        warmup_steps=1,
        weight_decay=0.01,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=True,
        seed=0,
        optim="adamw_torch",
        # The attention key bias has a gradient that is zero in exact arithmetic; with eps=1e-8 Adam
        # would turn its rounding noise (~1e-10, summed in another order on 2 ranks) into
        # learning-rate-sized steps. A larger eps keeps the comparison about the real gradients.
        adam_epsilon=1e-6,
    )
    base.update(kw)
    return TrainingArguments(**base)


def token_accuracy(pred: Any) -> dict[str, float]:
    logits, labels = pred.predictions, pred.label_ids
    guess = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    return {"accuracy": float((guess == target)[mask].mean()), "rows": float(labels.shape[0])}


def lora_gpt2() -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["c_attn", "c_proj"])
    return get_peft_model(tiny_gpt2(seed=0), config)


def lm_trainer(
    out: str, callbacks: list[TrainerCallback] | None = None, lora: bool = False, **kw: Any
) -> Trainer:
    return Trainer(
        model_init=lora_gpt2 if lora else (lambda: tiny_gpt2(seed=0)),
        args=lm_args(out, **kw),
        train_dataset=lm_examples(LM_TRAIN, seed=1),
        eval_dataset=lm_examples(LM_EVAL, seed=2),
        data_collator=pad_lm_batch,
        compute_metrics=token_accuracy,
        callbacks=callbacks,
    )


def lm_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Full parameters (gathered when sharded), as plain CPU tensors keyed by name."""
    full = trainer.strategy.model_state_dict(trainer.model_wrapped)
    return {f"param.{k}": v.detach().float().cpu().clone() for k, v in full.items()}


def write(out: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    if RANK != 0:
        return
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
    if meta is not None:
        (out / f"{name}.json").write_text(json.dumps(meta))


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# -- scenarios -------------------------------------------------------------------------------------------


def train_and_evaluate(out: Path, name: str, **kw: Any) -> Trainer:
    trainer = lm_trainer(str(out / name), **kw)
    result = trainer.train()
    metrics = trainer.evaluate()
    pred = trainer.predict(lm_examples(LM_EVAL, seed=2))
    state = lm_state(trainer)
    state["predictions"] = torch.from_numpy(pred.predictions).float()
    state["label_ids"] = torch.from_numpy(pred.label_ids)
    meta = {"losses": losses(trainer), "train_loss": result.training_loss, "eval": metrics}
    write(out, name, state, meta)
    return trainer


def interrupted_resume(out: Path, name: str, stop_at: int, **kw: Any) -> None:
    """Train until checkpoint `stop_at` is written, "crash", resume in a fresh Trainer."""
    first = lm_trainer(
        str(out / name), callbacks=[CrashAfterSave(stop_at)], save_strategy="steps", save_steps=2, **kw
    )
    try:
        first.train()
        raise AssertionError("the run should have crashed")
    except Crash:
        first.checkpointer.wait()  # an async save may still be in flight
    resumed = lm_trainer(str(out / name), save_strategy="steps", save_steps=2, **kw)
    resumed.train(resume_from_checkpoint=True)
    write(out, name, lm_state(resumed), {"losses": losses(resumed)})


def regression_resume(out: Path) -> None:
    """Dropout + random augmentation + 2 workers per rank: exact only if every rank's RNG comes back."""
    ref = Trainer(
        model_init=lambda: RegressionModel(dropout=0.2),
        args=job_args(str(out / "reg-ref")),
        train_dataset=AugmentedData(),
    )
    ref.train()
    run_dir = str(out / "reg-run")
    first = Trainer(
        model_init=lambda: RegressionModel(dropout=0.2),
        args=job_args(run_dir, save_async=True),
        train_dataset=AugmentedData(),
        callbacks=[CrashAfterSave(4)],
    )
    try:
        first.train()
    except Crash:
        first.checkpointer.wait()
    resumed = Trainer(
        model_init=lambda: RegressionModel(dropout=0.2), args=job_args(run_dir), train_dataset=AugmentedData()
    )
    resumed.train(resume_from_checkpoint=True)
    a, b = final_state(ref), final_state(resumed)
    write(out, "reg-ref", a)
    write(out, "reg-resumed", b)


def preempted_resume(out: Path, **kw: Any) -> None:
    """SIGTERM reaches rank 1 only; both ranks must save the same step and stop."""
    run_dir = str(out / "preempt")
    callbacks = [SignalAt(3, signal.SIGTERM)] if RANK == 1 else []
    first = lm_trainer(run_dir, callbacks=callbacks, **kw)
    try:
        first.train()
        raise AssertionError("training should have been preempted")
    except SystemExit as exc:
        assert exc.code == 143, exc.code
    assert first.state.global_step == 3, first.state.global_step
    assert (Path(run_dir) / "checkpoint-3" / "manifest.json").exists()
    resumed = lm_trainer(run_dir, **kw)
    resumed.train(resume_from_checkpoint=True)
    write(out, "preempt", lm_state(resumed), {"losses": losses(resumed)})


def failing_checkpoint(out: Path) -> None:
    """Rank 1 cannot write its part of checkpoint-4: every rank stops; checkpoint-2 stays intact."""
    from ember.checkpoint import CheckpointWriteError, state_io

    original = state_io.save_state

    def full_disk(state: Any, folder: Path, name: str) -> Any:
        if RANK == 1 and Path(folder).name.startswith("checkpoint-4"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(state, folder, name)

    state_io.save_state = full_disk  # type: ignore[assignment]
    run_dir = out / "failing"
    trainer = lm_trainer(str(run_dir), save_strategy="steps", save_steps=2)
    try:
        trainer.train()
        raise AssertionError("the save should have failed")
    except CheckpointWriteError as exc:
        message = str(exc)
    finally:
        state_io.save_state = original  # type: ignore[assignment]
    trainer.strategy.barrier()
    names = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint"))
    if RANK == 0:
        (out / "failing.json").write_text(json.dumps({"message": message, "folders": names}))
    else:
        (out / "failing-rank1.json").write_text(json.dumps({"message": message}))


class FileSizeLimit:
    """A real write failure on this process only: RLIMIT_FSIZE makes the kernel refuse to grow any
    file past `limit` bytes (write() fails with EFBIG, the way a quota or a full disk fails it),
    while the other rank writes into the same folder unhindered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        import resource

        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

    def __exit__(self, *exc: Any) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)


def sharded_storage_fault(out: Path, extra: list[str]) -> None:
    """FSDP: rank 1 cannot write its shard of checkpoint-4 (the kernel refuses the write): every
    rank stops with the reason, no checkpoint-4 or temporary folder is left, checkpoint-2 stays
    complete, and a fresh run resumes from it to the same weights as an uninterrupted run."""
    from ember.checkpoint import CheckpointWriteError, sharded

    save_async = "--async" in extra
    name = "fault-async" if save_async else "fault"
    original = sharded.save_sharded

    def save_sharded(tensors: Any, groups: Any, folder: Path, is_main: bool, group: Any) -> None:
        if RANK == 1 and folder.name.startswith("checkpoint-4"):
            with FileSizeLimit(4096):  # the shard file is ~40 kB; the JSON beside it is rank 0's
                return original(tensors, groups, folder, is_main, group)
        return original(tensors, groups, folder, is_main, group)

    # Past the limit the kernel sends SIGXFSZ before failing the write; ignored, the write is an
    # error, not a killed process. Set here: an async save's thread cannot set signal handlers.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sharded.save_sharded = save_sharded  # type: ignore[assignment]
    run_dir = out / name
    kw: dict[str, Any] = dict(
        fsdp=True, save_strategy="steps", save_steps=2, max_steps=6, save_async=save_async
    )
    trainer = lm_trainer(str(run_dir), **kw)
    message, step = "", -1
    try:
        trainer.train()
    except CheckpointWriteError as exc:
        message, step = str(exc), trainer.state.global_step
    finally:
        sharded.save_sharded = original  # type: ignore[assignment]
    trainer.strategy.barrier()
    names = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint"))
    resumed = lm_trainer(str(run_dir), **kw)
    resumed.train(resume_from_checkpoint=True)
    (out / f"{name}-rank{RANK}.json").write_text(
        json.dumps({"message": message, "step": step, "folders": names, "resumed_losses": losses(resumed)})
    )
    write(out, name, lm_state(resumed))
    reference = lm_trainer(str(out / f"{name}-ref"), **{**kw, "save_strategy": "no"})
    reference.train()
    write(out, f"{name}-ref", lm_state(reference))


def corrupt_shard(out: Path, extra: list[str]) -> None:
    """Resume (both ranks) from --run's checkpoint-4, one of whose shard files had a byte flipped."""
    from ember.checkpoint import CheckpointError

    run = extra[0]
    trainer = lm_trainer(run, fsdp=True, save_strategy="steps", save_steps=2, max_steps=6)
    message = ""
    try:
        trainer.train(resume_from_checkpoint=str(Path(run) / "checkpoint-4"))
    except CheckpointError as exc:
        message = str(exc)
    trainer.strategy.barrier()
    fallback = lm_trainer(run, fsdp=True, save_strategy="steps", save_steps=2, max_steps=6)
    fallback.train(resume_from_checkpoint=True)
    (out / f"corrupt-rank{RANK}.json").write_text(json.dumps({"message": message}))
    write(out, "corrupt-fallback", lm_state(fallback))


def die(out: Path) -> None:
    """Rank 1 is killed mid-training; rank 0 must fail fast, not hang."""
    callbacks = [SignalAt(3, signal.SIGKILL)] if RANK == 1 else []
    trainer = lm_trainer(str(out / "die"), callbacks=callbacks, ddp_timeout=30, max_steps=50)
    trainer.train()


def zero_config(stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto"},
    }


def deepspeed_suite(out: Path, extra: list[str]) -> None:
    stages = [int(s) for s in (extra or ["0", "2"])]
    train_and_evaluate(out, "ds-ddp-ref")
    for stage in stages:
        train_and_evaluate(out, f"zero{stage}", deepspeed=zero_config(stage))
        if stage > 0:
            interrupted_resume(out, f"zero{stage}-resume", stop_at=2, deepspeed=zero_config(stage))


def resume_elsewhere(out: Path, extra: list[str]) -> None:
    """Resume the run in --run (saved with any world size) here, with --batch per rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--fsdp", action="store_true")
    opts = parser.parse_args(extra)
    kw: dict[str, Any] = {"fsdp": True} if opts.fsdp else {}
    trainer = lm_trainer(
        opts.run, per_device_train_batch_size=opts.batch, save_strategy="steps", save_steps=2, **kw
    )
    trainer.train(resume_from_checkpoint=True)
    write(out, opts.name, lm_state(trainer), {"losses": losses(trainer)})


class Stall(TrainerCallback):
    """Stop responding for `seconds` at step `step` (a rank stuck in I/O or a deadlock)."""

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step + 1 == self.step:
            time.sleep(self.seconds)


def stall(out: Path) -> None:
    """Rank 1 hangs; rank 0 must give up after ddp_timeout instead of waiting forever."""
    callbacks = [Stall(3, 60)] if RANK == 1 else []
    lm_trainer(str(out / "stall"), callbacks=callbacks, ddp_timeout=5, max_steps=50).train()


def strategy_contract(out: Path, extra: list[str]) -> None:
    """Every multi-process strategy against the `Strategy` contract; results as JSON per rank."""
    import importlib.util
    import json

    from ember.strategy import build_strategy
    from ember.strategy.base import Strategy

    kinds: dict[str, dict[str, Any]] = {"ddp": {}, "fsdp": {"fsdp": True}}
    if importlib.util.find_spec("deepspeed") is not None:
        kinds["deepspeed"] = {"deepspeed": zero_config(0)}
    report: dict[str, Any] = {}
    for name, kw in kinds.items():
        strategy = build_strategy(lm_args(str(out / name), **kw))
        rows = RANK + 1  # ranks hold different numbers of rows and columns: gather pads and cuts
        mine = torch.full((rows, 2 + RANK), float(RANK))
        model = strategy.place_model(tiny_gpt2(seed=0))
        report[name] = {
            "is_strategy": isinstance(strategy, Strategy),
            "ranks": [strategy.rank, strategy.world_size, strategy.dp_rank, strategy.dp_world_size],
            "main": strategy.is_main,
            "sum": float(strategy.all_reduce_sum(torch.tensor(RANK + 1.0))),
            "any": [strategy.any_rank(RANK == 1), strategy.any_rank(False)],
            "gather": strategy.gather(mine).tolist(),
            "precision": strategy.precision.name,
            "placed_on": sorted({str(p.device) for p in model.parameters()}),
            "full_keys": len(strategy.model_state_dict(model)),
            "own_keys": len(tiny_gpt2(seed=0).state_dict()),
        }
        strategy.barrier()
    (out / f"contract-{RANK}.json").write_text(json.dumps(report))


def meta_fsdp(out: Path) -> None:
    """A model built on the meta device is sharded, then materialised shard by shard, and trains."""
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2(seed=0).config
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    trainer = Trainer(
        model=model,
        args=lm_args(str(out / "meta"), fsdp=True),
        train_dataset=lm_examples(LM_TRAIN, seed=1),
        data_collator=pad_lm_batch,
    )
    placed = sorted({p.device.type for p in trainer.model.parameters()})
    result = trainer.train()
    write(out, f"meta-{RANK}", lm_state(trainer), {"placed": placed, "train_loss": result.training_loss})


def locked(out: Path) -> None:
    """The test holds the lock on out/locked: every rank is refused (none waits in a collective);
    then a run on a free folder works, locked by rank 0 alone."""
    from ember.checkpoint.lock import LOCK_NAME, OutputDirLockedError

    try:
        lm_trainer(str(out / "locked"), max_steps=2).train()
        raise AssertionError("a run on a locked output_dir should be refused")
    except OutputDirLockedError as exc:
        (out / f"locked-rank{RANK}.txt").write_text(str(exc))
    trainer = lm_trainer(str(out / "free"), max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.strategy.barrier()
    assert not (out / "free" / LOCK_NAME).exists()


class NanOnThisRank(Trainer):
    """Rank 1's loss is NaN at step 3: a fault one rank sees and the other does not."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if RANK == 1 and self.state.global_step == 2 and model.training:
            return loss * float("nan")
        return loss


def nonfinite(out: Path) -> None:
    """Both ranks must skip the step whose gradients one rank made NaN (step 3), and the step where
    no rank has a target (step 4), and stay identical; rank 0 alone without targets (step 1) is a
    normal step."""
    calls = [0]

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = pad_lm_batch(features)
        if calls[0] in (6, 7) or (RANK == 0 and calls[0] in (0, 1)):
            batch["labels"][:] = -100
        calls[0] += 1
        return batch

    base = lm_trainer(str(out / "nonfinite"), max_steps=5, max_grad_norm=0.0)
    trainer = NanOnThisRank(
        model=tiny_gpt2(seed=0),
        args=base.args,
        train_dataset=base.train_dataset,
        data_collator=collate,
    )
    result = trainer.train()
    params = lm_state(trainer)
    step_logs = [h for h in trainer.state.log_history if "learning_rate" in h]
    summary = {
        "skipped": [h.get("skipped_steps") for h in step_logs],
        "train_loss": result.training_loss,
        "nonfinite_steps": trainer.step_guard.nonfinite_steps,
        "empty_steps": trainer.step_guard.empty_steps,
        "finite": all(bool(torch.isfinite(v).all()) for v in params.values()),
        "checksum": float(sum(v.double().sum() for v in params.values())),
        "global_step": trainer.state.global_step,
        "losses": losses(trainer),
    }
    (out / f"nonfinite-rank{RANK}.json").write_text(json.dumps(summary))


class SpikeAt(Trainer):
    """The loss (and so the gradients) of step 5 is 100 times too large on every rank."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * 100 if self.state.global_step == 4 and model.training else loss


def spike(out: Path, name: str, **kw: Any) -> None:
    """Every rank rolls the spiking step back the same way (DDP: full copies; FSDP: local shards)."""
    base = lm_trainer(str(out / name), max_steps=6, loss_spike_zscore=50.0, loss_spike_window=3, **kw)
    trainer = SpikeAt(
        model=tiny_gpt2(seed=0), args=base.args, train_dataset=base.train_dataset, data_collator=pad_lm_batch
    )
    trainer.train()
    params = lm_state(trainer)
    assert trainer.step_guard.spikes is not None
    summary = {
        "rollbacks": trainer.step_guard.spikes.rollbacks,
        "finite": all(bool(torch.isfinite(v).all()) for v in params.values()),
        "checksum": float(sum(v.double().sum() for v in params.values())),
    }
    (out / f"{name}-rank{RANK}.json").write_text(json.dumps(summary))


class WeightsAt(TrainerCallback):
    """Full weights at the end of the given steps, after the guard acted (every rank gathers)."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps
        self.trainer: Trainer | None = None
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step in self.steps and self.trainer is not None:
            self.at[state.global_step] = lm_state(self.trainer)


def spike_deepspeed(out: Path, extra: list[str]) -> None:
    """The spike of `SpikeAt` under DDP and under each ZeRO stage given: the copy is kept after
    step 3 and step 5 spikes, so the weights after step 5 must be those after step 3, and step 6
    must continue from there as under DDP (model and optimizer moments both rolled back)."""
    runs: dict[str, dict[str, Any]] = {"ds-spike-ddp": {}}
    runs.update({f"ds-spike-zero{s}": {"deepspeed": zero_config(int(s))} for s in extra or ["2"]})
    for name, kw in runs.items():
        base = lm_trainer(str(out / name), max_steps=6, loss_spike_zscore=50.0, loss_spike_window=3, **kw)
        weights = WeightsAt((3, 5))
        trainer = SpikeAt(
            model=tiny_gpt2(seed=0),
            args=base.args,
            train_dataset=base.train_dataset,
            data_collator=pad_lm_batch,
            callbacks=[weights],
        )
        weights.trainer = trainer
        trainer.train()
        assert trainer.step_guard.spikes is not None
        final = lm_state(trainer)
        step3 = {k.replace("param.", "step3."): v for k, v in weights.at[3].items()}
        step5 = {k.replace("param.", "step5."): v for k, v in weights.at[5].items()}
        meta = {
            "rollbacks": trainer.step_guard.spikes.rollbacks,
            "global_step": trainer.state.global_step,
            "losses": losses(trainer),
        }
        write(out, name, {**final, **step3, **step5}, meta)
    # Optimizer state swapped to NVMe cannot be copied in memory: refused before any step.
    nvme = zero_config(3)
    nvme["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": str(out)}
    try:
        lm_trainer(str(out / "nvme"), loss_spike_zscore=3.0, deepspeed=nvme)
        raise AssertionError("a rollback the strategy cannot do should be refused")
    except ValueError as exc:
        (out / f"nvme-refused-rank{RANK}.txt").write_text(str(exc))


SUITES = {
    "contract": lambda out, o: (strategy_contract(out, o), meta_fsdp(out)),
    "ddp": lambda out, o: (
        train_and_evaluate(out, "ddp"),
        train_and_evaluate(out, "ddp-ac", activation_checkpointing=True),
        train_and_evaluate(out, "ddp-lora", lora=True),
        interrupted_resume(out, "ddp-lora-resume", stop_at=2, lora=True),
        train_and_evaluate(
            out,
            "ddp-static",
            ddp_static_graph=True,
            gradient_accumulation_steps=1,
            per_device_train_batch_size=4,
        ),
        interrupted_resume(out, "ddp-resume", stop_at=2, save_async=True),
        preempted_resume(out),
        failing_checkpoint(out),
        regression_resume(out),
    ),
    "fsdp": lambda out, o: (
        train_and_evaluate(out, "ddp-ref"),
        train_and_evaluate(out, "fsdp", fsdp=True),
        train_and_evaluate(out, "fsdp-ac", fsdp=True, activation_checkpointing=True),
        interrupted_resume(out, "fsdp-resume", stop_at=2, fsdp=True, save_async=True),
    ),
    "deepspeed": lambda out, o: deepspeed_suite(out, o),
    "resume": resume_elsewhere,
    "die": lambda out, o: die(out),
    "stall": lambda out, o: stall(out),
    "locked": lambda out, o: locked(out),
    "nonfinite": lambda out, o: (nonfinite(out), spike(out, "spike-ddp")),
    "spike-fsdp": lambda out, o: spike(out, "spike-fsdp", fsdp=True),
    "spike-deepspeed": spike_deepspeed,
    "sharded-fault": sharded_storage_fault,
    "corrupt-shard": corrupt_shard,
}


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("out")
    opts, rest = parser.parse_known_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    SUITES[opts.suite](out, rest)
    print(f"rank {RANK}: suite {opts.suite} done", file=sys.stderr)


if __name__ == "__main__":
    main()
