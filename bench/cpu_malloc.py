"""Where a compute-bound CPU step's extra time went: user CPU vs kernel time and page faults, for the
raw loop and ember, with glibc's malloc thresholds moving (its default) or fixed.

    python -m bench.cpu_malloc                 # workload b (GPT-2 6x256), 5 rounds, 30 steps
    python -m bench.cpu_malloc --workload a    # the small model

Four runs per round, each in a fresh process, in a rotating order:
- raw: the raw PyTorch loop of bench/runners.py, glibc defaults;
- raw+fixed: the same loop after `ember.telemetry.cpu_malloc.keep_heap_between_steps()` (what ember does);
- ember: ember's Trainer as shipped (`tune_cpu_malloc=True`);
- ember-untuned: ember's Trainer with `tune_cpu_malloc=False` (glibc defaults).

Per run, over the optimizer steps after the first third (the allocator's warm-up): median step CPU
time, and per step the user CPU, the kernel (system) CPU and the minor page faults (pages the
kernel maps and zeroes for the process), from getrusage. A step's user time is the work of the
code; kernel time on a compute loop is almost all page faults. Results: bench/results/cpu-malloc.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.perf_common import fmt, machine, med, run_child, write_results

MODES = ("raw", "raw+fixed", "ember", "ember-untuned")


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import time

    import torch

    torch.set_num_threads(1)
    from bench import runners, workloads

    w = workloads.with_steps(workloads.WORKLOADS[spec["workload"]], spec["steps"])
    mode = spec["mode"]
    marks: list[tuple[float, float, int, float]] = []

    class Clock(runners.StepClock):
        def tick(self) -> None:
            super().tick()
            marks.append((*_usage(), time.process_time()))

    clock = Clock(torch.device("cpu"), w.steps)
    model = workloads.build_model(w)
    data = workloads.make_dataset(w, w.train_samples)
    with tempfile.TemporaryDirectory() as out:
        ctx = {"device": torch.device("cpu"), "clock": clock, "output_dir": out, "bf16": False, "variant": ""}
        if mode.startswith("raw"):
            if mode == "raw+fixed":
                from ember.telemetry.cpu_malloc import keep_heap_between_steps

                assert keep_heap_between_steps(), "mallopt was refused (not glibc, or MALLOC_* set)"
            runners.raw_train(model, data, w, ctx)
        else:
            import ember
            from ember.telemetry import cpu_malloc

            lib = type("Lib", (), {})()
            lib.Trainer = ember.Trainer
            lib.TrainerCallback = ember.TrainerCallback
            tune = mode == "ember"

            def arguments(**kw: Any) -> Any:
                return ember.TrainingArguments(**kw, tune_cpu_malloc=tune)

            lib.TrainingArguments = arguments
            runners.trainer_run(lib, model, data, w, ctx)
            # (untuned, it stays unapplied only in a fresh process, which is how this runs)
            assert cpu_malloc.applied() or not tune, "ember did not fix the malloc thresholds"
    start = max(1, len(marks) // 3)
    steady = marks[start:]
    steps = len(steady) - 1
    diffs = [b[3] - a[3] for a, b in zip(steady, steady[1:])]
    return {
        **spec,
        "ok": True,
        "step_cpu_ms_median": 1e3 * statistics.median(diffs),
        "user_ms_per_step": 1e3 * (steady[-1][0] - steady[0][0]) / steps,
        "sys_ms_per_step": 1e3 * (steady[-1][1] - steady[0][1]) / steps,
        "faults_per_step": (steady[-1][2] - steady[0][2]) / steps,
    }


KEYS = ("step_cpu_ms_median", "user_ms_per_step", "sys_ms_per_step", "faults_per_step")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in runs if r.get("ok") and r["mode"] == mode]
        if mine:
            rows[mode] = {k: med([r[k] for r in mine]) for k in KEYS}
            rows[mode]["all_step_cpu_ms"] = [round(r["step_cpu_ms_median"], 1) for r in mine]
            rows[mode]["all_faults"] = [round(r["faults_per_step"]) for r in mine]
    ratios: dict[str, list[float]] = {}
    rounds = sorted({r["round"] for r in runs})
    for num, den in (
        ("ember", "raw"),
        ("ember", "raw+fixed"),
        ("ember-untuned", "raw"),
        ("raw+fixed", "raw"),
    ):
        per = []
        for k in rounds:
            a = [r for r in runs if r.get("ok") and r["round"] == k and r["mode"] == num]
            b = [r for r in runs if r.get("ok") and r["round"] == k and r["mode"] == den]
            if a and b:
                per.append(a[0]["step_cpu_ms_median"] / b[0]["step_cpu_ms_median"])
        if per:
            ratios[f"{num} / {den}"] = per
    return {"rows": rows, "ratios": ratios}


def render(payload: dict[str, Any]) -> str:
    m, cfg, s = payload["machine"], payload["config"], payload["summary"]
    lines = [
        f"# CPU step time: user work vs kernel page faults ({m['date_utc']})",
        "",
        f"- {m['platform']}, python {m['python']}, torch {m['torch']}; ember at {m.get('ember_commit')}",
        f"- workload {cfg['workload']}, {cfg['steps']} steps, 1 thread, OMP_WAIT_POLICY=PASSIVE, fp32; "
        f"{cfg['rounds']} rounds of 4 fresh processes in rotating order; load average {m['load_avg']}",
        "- per run, steps after the first third; medians over rounds",
        "- command: `python -m bench.cpu_malloc " + " ".join(cfg["argv"]) + "`",
        "",
        "| run | step CPU ms (median) | user ms / step | kernel ms / step | page faults / step | "
        "step CPU ms, every round | faults / step, every round |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in s["rows"].items():
        lines.append(
            f"| {mode} | {fmt(row['step_cpu_ms_median'])} | {fmt(row['user_ms_per_step'])} | "
            f"{fmt(row['sys_ms_per_step'])} | {fmt(row['faults_per_step'], 0)} | "
            f"{', '.join(map(str, row['all_step_cpu_ms']))} | {', '.join(map(str, row['all_faults']))} |"
        )
    lines += ["", "| ratio of step CPU time | median | every round |", "|---|---|---|"]
    for key, per in s["ratios"].items():
        lines.append(f"| {key} | {statistics.median(per):.3f} | {', '.join(f'{x:.3f}' for x in per)} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_malloc")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="b")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="workload a, 4 steps, 1 round: checks that it runs")
    p.add_argument("--tag", default=None)
    raw_argv = sys.argv[1:] if argv is None else argv
    ns = p.parse_args(raw_argv)
    if ns.child:
        result = child(json.loads(ns.child))
        Path(ns.out).write_text(json.dumps(result))
        return 0
    if ns.smoke:
        ns.workload, ns.steps, ns.rounds = "a", 4, 1
    runs = []
    for k in range(ns.rounds):
        order = MODES[k % len(MODES) :] + MODES[: k % len(MODES)]
        for mode in order:
            spec = {"mode": mode, "workload": ns.workload, "steps": ns.steps, "round": k}
            result = run_child("bench.cpu_malloc", spec)
            if not result.get("ok"):
                print(f"{mode} failed:\n{result.get('error')}", file=sys.stderr)
                return 1
            print(f"[round {k + 1}/{ns.rounds}] {mode:14} step CPU {result['step_cpu_ms_median']:.1f} ms, "
                  f"faults/step {result['faults_per_step']:.0f}", flush=True)  # fmt: skip
            runs.append(result)
    config = {"workload": ns.workload, "steps": ns.steps, "rounds": ns.rounds, "argv": raw_argv}
    payload = {"machine": machine(), "config": config, "runs": runs, "summary": summarise(runs)}
    tag = ns.tag or ("cpu-malloc-smoke" if ns.smoke else "cpu-malloc")
    write_results(tag, payload, render(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
