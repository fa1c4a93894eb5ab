"""DDP benchmark: the same 2-process job as a hand-written torch DDP loop, ember's Trainer, and the
transformers Trainer, each launched with torchrun; reports steady-state step time and the ratio
to the hand-written loop.

    python -m bench.ddp                       # workloads a and c, 2 processes, CPU (gloo)
    python -m bench.ddp --steps 40 --workloads a --impls raw,ember

Every implementation trains the tiny GPT-2 of `bench.workloads` on fixed-length sequences with the
same per-process batch, accumulation, AdamW (fused), clipping and linear schedule; each rank reads
its own half of the data. One intra-op thread per process, so two processes fit a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .workloads import WORKLOADS, Workload, with_steps

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("raw", "ember", "transformers")


# -- child: one rank of one implementation --------------------------------------------------------------


def raw_ddp_train(w: Workload, ctx: dict[str, Any]) -> dict[str, Any]:
    """What a careful engineer writes by hand: DDP, no_sync while accumulating, fused AdamW."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from .runners import linear_warmup, raw_optimizer
    from .workloads import build_model, collate, make_dataset

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    clock = ctx["clock"]
    model = DistributedDataParallel(build_model(w))
    optimizer = raw_optimizer(model.module, w, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(w.warmup_steps, w.steps))
    data = make_dataset(w, w.train_samples * world)[rank::world]
    batches = iter(DataLoader(data, batch_size=w.batch, shuffle=False, collate_fn=collate))
    start = time.perf_counter()
    since_log = torch.zeros(())
    for step in range(1, w.steps + 1):
        for micro in range(w.grad_accum):
            sync = micro == w.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = model(**next(batches)).loss / w.grad_accum
                loss.backward()
            since_log += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
        if step % w.logging_steps == 0:
            logged = since_log.clone()
            dist.all_reduce(logged)
            since_log.zero_()
            if rank == 0:
                print({"loss": float(logged) / world / w.logging_steps})
    end = time.perf_counter()
    dist.barrier()
    dist.destroy_process_group()
    return {"main_s": end - start, "end": end}


def trainer_ddp_train(lib: Any, w: Workload, ctx: dict[str, Any]) -> dict[str, Any]:
    from .runners import trainer_run
    from .workloads import build_model, make_dataset

    world = int(os.environ["WORLD_SIZE"])
    # Each Trainer gives rank r its share of the dataset itself.
    return trainer_run(lib, build_model(w), make_dataset(w, w.train_samples * world), w, ctx)


def child(impl: str, w: Workload, out: str) -> None:
    import torch

    from .runners import StepClock

    torch.set_num_threads(1)
    device = torch.device("cpu")
    ctx: dict[str, Any] = {
        "device": device,
        "clock": StepClock(device, w.steps),
        "output_dir": tempfile.mkdtemp(prefix=f"ember-ddp-bench-{impl}-"),
        "bf16": False,
        "variant": "",
    }
    if impl == "raw":
        result = raw_ddp_train(w, ctx)
    else:
        lib = __import__("ember" if impl == "ember" else "transformers")
        result = trainer_ddp_train(lib, w, ctx)
    result.update(ctx["clock"].summary(result["end"]))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({"impl": impl, "workload": w.name, **result}, default=str))


# -- parent ----------------------------------------------------------------------------------------------


def launch(impl: str, w: Workload, nproc: int, timeout: float) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "bench.ddp", "--child", impl, "--workload-json", json.dumps(w.to_dict()), "--out", str(out),
        ]  # fmt: skip
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "TOKENIZERS_PARALLELISM": "false",
        }
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not out.exists():
            print(f"  {impl}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
        return dict(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="a,c")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median counts")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--workload-json", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child(opts.child, Workload.from_dict(json.loads(opts.workload_json)), opts.out)
        return 0
    rows = []
    impls = opts.impls.split(",")
    for name in opts.workloads.split(","):
        w = with_steps(WORKLOADS[name], opts.steps)
        print(f"workload {name}: {w.title}, {opts.nproc} processes, {w.steps} steps", flush=True)
        # Rounds interleave the implementations, so a burst of load from elsewhere hits all of them.
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for _ in range(opts.repeats):
            for impl in impls:
                result = launch(impl, w, opts.nproc, opts.timeout)
                if result and result.get("steady_step_ms"):
                    times[impl].append(float(result["steady_step_ms"]))
        base = statistics.median(times["raw"]) if times.get("raw") else None
        for impl, series in times.items():
            if not series:
                continue
            ms = statistics.median(series)
            ratio = ms / base if base else None
            shown = f"{ratio:.3f}x raw" if ratio else ""
            print(f"  {impl:<13} {ms:8.2f} ms/step (median of {len(series)}: {series})  {shown}", flush=True)
            rows.append(
                {"workload": name, "impl": impl, "steady_step_ms": ms, "runs": series, "ratio_to_raw": ratio}
            )
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
