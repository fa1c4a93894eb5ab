"""Where ember's per-step time goes, beyond the model: `python -m bench.profile_step`.

Three measurements, all in one process with one thread:

1. overhead: raw loop and ember's Trainer alternate on the same job (default: workload a shrunk
   to a tiny model, so the loop's own cost is not hidden under matmuls); the difference of their
   median step times is ember's overhead per step, in microseconds.
2. data: one epoch through ember's training DataLoader (SeededDataset + SeededCollator, per-batch
   RNG fork) against a plain DataLoader with the same collator, no model: the pipeline's cost per
   batch; and `fork_rng` alone.
3. profile: cProfile of ember's `train()`; every function under `ember/` with its time per step
   (cumulative and own), so the costs can be traced to file:line.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import os
import pstats
import statistics
import time
import timeit
import types
from typing import Any

import torch

from . import runners, workloads


def _ctx(out_dir: str, total: int) -> dict[str, Any]:
    clock = runners.StepClock(torch.device("cpu"), total)
    return {
        "device": torch.device("cpu"),
        "clock": clock,
        "output_dir": out_dir,
        "bf16": False,
        "variant": "",
    }


def _ember() -> Any:
    import ember

    return types.SimpleNamespace(
        Trainer=ember.Trainer,
        TrainingArguments=ember.TrainingArguments,
        TrainerCallback=ember.TrainerCallback,
    )


def run_once(impl: str, w: workloads.Workload, out_dir: str) -> dict[str, Any]:
    model = workloads.build_model(w)
    data = workloads.make_dataset(w, w.train_samples)
    ctx = _ctx(out_dir, w.steps)
    with contextlib.redirect_stdout(io.StringIO()):
        if impl == "raw":
            res = runners.raw_train(model, data, w, ctx)
        else:
            res = runners.trainer_run(_ember(), model, data, w, ctx)
    res.update(ctx["clock"].summary(res.pop("end")))
    return res


def overhead(w: workloads.Workload, rounds: int, out_dir: str) -> dict[str, Any]:
    """Median step time (wall and CPU) of raw and ember, alternating; the difference is ember's cost."""
    keys = {"wall": "step_ms_median", "cpu": "step_cpu_ms_median"}
    per: dict[str, dict[str, list[float]]] = {k: {"raw": [], "ember": []} for k in keys}
    train: dict[str, list[float]] = {"raw": [], "ember": []}
    for _ in range(rounds):
        for impl in train:
            res = run_once(impl, w, out_dir)
            for kind, key in keys.items():
                per[kind][impl].append(res[key] * 1e3)
            train[impl].append(res["main_cpu_s"] / w.steps * 1e6)
    out: dict[str, Any] = {"rounds": rounds}
    for kind in keys:
        med = {k: statistics.median(v) for k, v in per[kind].items()}
        out[f"step_us_{kind}"] = med
        out[f"overhead_us_{kind}"] = med["ember"] - med["raw"]
    cpu_per_step = {k: statistics.median(v) for k, v in train.items()}
    out["train_cpu_us_per_step"] = cpu_per_step
    out["overhead_us_train_cpu"] = cpu_per_step["ember"] - cpu_per_step["raw"]
    return out


def data_pipeline(w: workloads.Workload, repeats: int = 5) -> dict[str, float]:
    """Per-batch cost of ember's training loader vs a plain DataLoader, without any model."""
    from torch.utils.data import DataLoader

    import ember
    from ember.data import build_train_dataloader, fork_rng

    data = workloads.make_dataset(w, w.train_samples)
    args = ember.TrainingArguments(
        output_dir=os.devnull,
        per_device_train_batch_size=w.batch,
        train_sampling_strategy="sequential",
        report_to="none",
    )

    def epoch(loader: Any) -> float:
        start = time.perf_counter()
        n = sum(1 for _ in loader)
        return (time.perf_counter() - start) / n * 1e6

    plain = DataLoader(data, batch_size=w.batch, shuffle=False, collate_fn=workloads.collate)
    ember_loader = build_train_dataloader(data, args, workloads.collate)
    ember_loader.batch_sampler.set_epoch(0)
    plain_us = min(epoch(plain) for _ in range(repeats))
    ember_us = min(epoch(ember_loader) for _ in range(repeats))
    calls = 2000

    def fork() -> None:
        with fork_rng(12345):
            pass

    fork_us = min(timeit.repeat(fork, number=calls, repeat=5)) / calls * 1e6
    return {
        "plain_loader_us_per_batch": plain_us,
        "ember_loader_us_per_batch": ember_us,
        "loader_overhead_us_per_batch": ember_us - plain_us,
        "fork_rng_us_per_call": fork_us,
    }


def profile(w: workloads.Workload, out_dir: str, top: int) -> list[dict[str, Any]]:
    """cProfile of ember's train(); ember functions by cumulative time per optimizer step."""
    model = workloads.build_model(w)
    data = workloads.make_dataset(w, w.train_samples)
    ctx = _ctx(out_dir, w.steps)
    lib = _ember()
    prof = cProfile.Profile()
    with contextlib.redirect_stdout(io.StringIO()):
        prof.enable()
        runners.trainer_run(lib, model, data, w, ctx)
        prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if f"{os.sep}ember{os.sep}" not in filename or f"{os.sep}bench{os.sep}" in filename:
            continue
        rows.append(
            {
                "where": f"{os.path.relpath(filename, root)}:{line}",
                "function": func,
                "calls_per_step": ncalls / w.steps,
                "cum_us_per_step": cumtime / w.steps * 1e6,
                "own_us_per_step": tottime / w.steps * 1e6,
            }
        )
    rows.sort(key=lambda r: r["cum_us_per_step"], reverse=True)
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="a")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--tiny", action="store_true", help="shrink the model (1x32, seq 32, batch 4) to expose overhead"
    )
    p.add_argument("--top", type=int, default=30)
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    w = workloads.WORKLOADS[ns.workload]
    if ns.tiny:
        w = dataclasses.replace(workloads.smoke(w), steps=ns.steps, logging_steps=w.logging_steps)
    else:
        w = workloads.with_steps(w, ns.steps)
    import tempfile

    with tempfile.TemporaryDirectory() as out_dir:
        run_once("ember", w, out_dir)  # warm: first-call costs (imports, allocator) out of the way
        over = overhead(w, ns.rounds, out_dir)
        pipe = data_pipeline(w)
        rows = profile(w, out_dir, ns.top)
    print(
        f"workload {w.name}{' (tiny)' if ns.tiny else ''}: {w.n_layer}x{w.n_embd}, seq {w.seq}, "
        f"batch {w.batch}, {w.steps} steps, {ns.rounds} rounds, 1 thread"
    )
    for kind in ("wall", "cpu"):
        med = over[f"step_us_{kind}"]
        print(
            f"\nmedian step {kind} time: raw {med['raw']:.0f} us, ember {med['ember']:.0f} us "
            f"-> ember overhead {over[f'overhead_us_{kind}']:+.0f} us per step"
        )
    cpu = over["train_cpu_us_per_step"]
    print(
        f"train() CPU time per step: raw {cpu['raw']:.0f} us, ember {cpu['ember']:.0f} us "
        f"-> {over['overhead_us_train_cpu']:+.0f} us (includes set-up and logging)"
    )
    print(
        f"\ndata pipeline per batch: plain DataLoader {pipe['plain_loader_us_per_batch']:.0f} us, "
        f"ember loader {pipe['ember_loader_us_per_batch']:.0f} us "
        f"(+{pipe['loader_overhead_us_per_batch']:.0f} us); "
        f"fork_rng alone {pipe['fork_rng_us_per_call']:.1f} us per call"
    )
    print("\ncProfile of ember's train() (profiler overhead inflates Python-heavy rows), per optimizer step:")
    print(f"{'cum us':>9} {'own us':>9} {'calls':>6}  function  (file:line)")
    for r in rows:
        print(
            f"{r['cum_us_per_step']:9.1f} {r['own_us_per_step']:9.1f} {r['calls_per_step']:6.1f}  "
            f"{r['function']}  ({r['where']})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
