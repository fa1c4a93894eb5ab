"""GPU check of the distributed strategies (not collected by pytest; needs CUDA). Run through
`bench/gpu_distributed.sh`, which launches it with torchrun on every GPU of the machine.

On each strategy (DDP over NCCL, FSDP2 with bf16 mixed precision, FSDP2 with CPU offload,
DeepSpeed ZeRO-2 and ZeRO-3 in bf16 when deepspeed is installed) it trains the tiny LM job, checks
the loss against a one-process fp32 reference (bf16 tolerance), then interrupts and resumes with an
asynchronous save and checks the resumed weights equal the uninterrupted ones. Rank 0 prints one
line per check and a final PASS/FAIL; the exit status is 0 only if every check passed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from tests.strategy.worker import Crash, CrashAfterSave, lm_state, lm_trainer

RANK = int(os.environ.get("RANK", "0"))
# EMBER_CHECK_ON_CPU=1 runs the same checks on the CPU (a dry run of this script).
GPU = {"use_cpu": os.environ.get("EMBER_CHECK_ON_CPU") == "1"}


def _run(out: Path, name: str, **kw: Any) -> tuple[dict[str, torch.Tensor], float]:
    trainer = lm_trainer(str(out / name), **GPU, **kw)
    result = trainer.train()
    return lm_state(trainer), result.training_loss


def _resume(out: Path, name: str, **kw: Any) -> dict[str, torch.Tensor]:
    first = lm_trainer(
        str(out / name), callbacks=[CrashAfterSave(2)], save_strategy="steps", save_steps=2, **GPU, **kw
    )
    try:
        first.train()
    except Crash:
        first.checkpointer.wait()
    resumed = lm_trainer(str(out / name), save_strategy="steps", save_steps=2, **GPU, **kw)
    resumed.train(resume_from_checkpoint=True)
    return lm_state(resumed)


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b)


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="ember-gpu-dist-"))
    zero = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": "auto"},
    }
    cases: list[tuple[str, dict[str, Any]]] = [
        ("ddp-nccl-fp32", {}),
        ("fsdp-bf16", {"fsdp": True, "bf16": True}),
    ]
    if not GPU["use_cpu"]:
        cases.append(
            ("fsdp-bf16-offload", {"fsdp": True, "bf16": True, "fsdp_config": {"cpu_offload": True}})
        )
    try:
        import deepspeed  # noqa: F401

        cases += [
            ("zero2-bf16", {"bf16": True, "deepspeed": {**zero, "zero_optimization": {"stage": 2}}}),
            ("zero3-bf16", {"bf16": True, "deepspeed": {**zero, "zero_optimization": {"stage": 3}}}),
        ]
    except ImportError:
        if RANK == 0:
            print("deepspeed not installed: ZeRO checks skipped", flush=True)
    reference: dict[str, torch.Tensor] = {}
    ref_loss = 0.0
    failures = 0
    for name, kw in cases:
        try:
            state, loss = _run(out, name, **kw)
            if not reference:  # the first case, DDP in fp32, is the reference of the others
                reference, ref_loss = state, loss
            resumed = _resume(out, f"{name}-resume", **kw)
            tol = 5e-2 if kw.get("bf16") else 1e-5
            ok = (
                abs(loss - ref_loss) < tol
                and _diff(state, resumed) == 0.0
                and _diff(state, reference) < 10 * tol
            )
            line = (
                f"{name}: loss {loss:.5f} (ref {ref_loss:.5f}), max weight diff to ref "
                f"{_diff(state, reference):.2e}, resume diff {_diff(state, resumed):.2e}"
            )
        except Exception:
            ok, line = False, f"{name}: error\n{traceback.format_exc()}"
        failures += not ok
        if RANK == 0:
            print(("ok   " if ok else "FAIL ") + line, flush=True)
    if RANK == 0:
        print("PASS" if failures == 0 else f"FAIL ({failures} checks)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    sys.exit(main())
