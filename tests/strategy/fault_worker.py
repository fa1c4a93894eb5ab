"""One rank fails (raises, hangs, or is killed) in a 2-process job: `python -m tests.strategy.fault_worker
SCENARIO OUT`. Started by hand (tests/strategy/launch.py) or by torchrun; see test_rank_failures.py."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ember import Trainer, TrainerCallback
from ember.callbacks.state import ExportableState
from tests.helpers import pad_lm_batch
from tests.strategy.worker import lm_state, lm_trainer

RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
FAILING = 1  # the rank that fails, unless a scenario says otherwise


class At(TrainerCallback):
    """Run `action` on `event` of step `step` (global_step + 1 for on_step_begin, else global_step)."""

    def __init__(self, event: str, step: int, action: Any) -> None:
        self.event, self.step, self.action = event, step, action
        setattr(self, event, self._fire)

    def _fire(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        now = state.global_step + (1 if self.event == "on_step_begin" else 0)
        if now == self.step:
            self.action()


def boom() -> None:
    raise RuntimeError("boom in a callback\nsecond line that the summary leaves out")


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class OomAt(Trainer):
    """An out-of-memory error in the forward of step 2 on this rank only."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if self.state.global_step == 1 and model.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def failing_collator(bad_call: int, hang: float = 0.0) -> Any:
    calls = [0]

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        calls[0] += 1
        if calls[0] == bad_call:
            if hang:
                time.sleep(hang)
            else:
                raise ValueError(f"row {calls[0]} has no input_ids")
        return pad_lm_batch(features)

    return collate


class StateFailsAt(TrainerCallback, ExportableState):
    """Its state, gathered for every save, cannot be taken on this rank at step `step`: the rank
    fails before it enters the save's collectives, while its peers are already in them."""

    def __init__(self, step: int = 4, hang: float = 0.0) -> None:
        self.step, self.hang, self.now = step, hang, 0

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.now = state.global_step

    def state(self) -> dict[str, Any]:
        if self.now == self.step and RANK == FAILING:
            if self.hang:
                time.sleep(self.hang)
            raise OSError(28, "No space left on device (gathering the callback state)")
        return {"args": {"step": self.step}, "attributes": {}}


def broken_metrics(pred: Any) -> dict[str, float]:
    raise KeyError("accuracy needs labels")


def scenario(name: str, out: Path) -> Trainer:
    """The trainer of `name`, with its fault planted on the failing rank."""
    mine = RANK == FAILING
    common: dict[str, Any] = dict(max_steps=8, ddp_timeout=600, peer_stall_timeout=4)
    if name == "callback":
        return lm_trainer(str(out / name), callbacks=[At("on_step_end", 3, boom)] if mine else [], **common)
    if name == "collator":
        trainer = lm_trainer(str(out / name), **common)
        if mine:
            trainer.data_collator = failing_collator(5)
        return trainer
    if name == "metrics":  # compute_metrics runs on rank 0 only, and raises there
        trainer = lm_trainer(str(out / name), eval_strategy="steps", eval_steps=2, **common)
        if RANK == 0:
            trainer.compute_metrics = broken_metrics
        return trainer
    if name == "oom":
        base = lm_trainer(str(out / name), **common)
        cls = OomAt if mine else Trainer
        return cls(
            model_init=base.model_init,
            args=base.args,
            train_dataset=base.train_dataset,
            data_collator=pad_lm_batch,
        )
    if name == "hang-callback":
        sleep = At("on_step_end", 3, lambda: time.sleep(300))
        return lm_trainer(str(out / name), callbacks=[sleep] if mine else [], **common)
    if name == "hang-collator":
        trainer = lm_trainer(str(out / name), **common)
        if mine:
            trainer.data_collator = failing_collator(5, hang=300)
        return trainer
    if name in ("save-state", "save-state-fsdp", "save-state-async", "save-hang"):
        # Saves at steps 2 and 4; rank 1 fails (or hangs) gathering its state for the save of
        # step 4, after checkpoint-2 is complete. The other rank must not wait in the save.
        extra: dict[str, Any] = {"fsdp": True} if name.endswith("fsdp") else {}
        extra.update({"save_async": True} if name.endswith("async") else {})
        return lm_trainer(
            str(out / name),
            callbacks=[StateFailsAt(4, hang=300 if name == "save-hang" else 0)],
            save_strategy="steps",
            save_steps=2,
            **common,
            **extra,
        )
    if name in ("restart", "straight"):
        # Killed once (first attempt only) at the start of step 6, after checkpoint-4: torchrun
        # restarts both ranks, and auto_resume (unset) continues from checkpoint-4.
        kill = name == "restart" and ATTEMPT == 0 and int(os.environ.get("KILL_RANK", "1")) == RANK
        return lm_trainer(
            str(out / name),
            callbacks=[At("on_step_begin", 6, kill_self)] if kill else [],
            max_steps=8,
            save_strategy="steps",
            save_steps=2,
        )
    raise SystemExit(f"unknown scenario {name}")


class StartStep(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.step = state.global_step


def main() -> None:
    torch.set_num_threads(1)
    name, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    trainer = scenario(name, out)
    start = StartStep()
    trainer.add_callback(start)
    began = time.monotonic()
    try:
        trainer.train()
    except Exception:
        if RANK == FAILING and os.environ.get("STAY_ALIVE"):
            # A script that catches the error and goes on (cleanup, an upload, the next trial):
            # its process, and its end of the process group, stay alive meanwhile.
            print(
                f"rank {RANK}: train() raised after {time.monotonic() - began:.1f}s; staying alive",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(float(os.environ["STAY_ALIVE"]))
        raise
    finally:
        print(
            f"rank {RANK}: train() ended after {time.monotonic() - began:.1f}s", file=sys.stderr, flush=True
        )
    if RANK == 0:
        state = lm_state(trainer)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"))
        (out / f"{name}.json").write_text(json.dumps({"start_step": start.step, "attempt": ATTEMPT}))


if __name__ == "__main__":
    main()
