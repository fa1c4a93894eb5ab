"""Run the same training job three ways, interleaved, and report: `python -m bench.compare`.

Raw PyTorch loop, ember's Trainer and transformers' Trainer run one after the other (A B C A B C
...), each in its own fresh interpreter, so import time, peak RSS and time to first step are
the process's own. The parent only starts children and reads the JSON they write; it never
imports torch. Results go to `bench/results/<tag>.json` and `<tag>.md`.

    python -m bench.compare --workloads a,b --reps 3
    python -m bench.compare --smoke --workloads a        # CI: a few steps, one round, < 60 s
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import report
from .workloads import CPU_WORKLOADS, WORKLOADS, Workload, smoke, with_steps

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workloads", default=",".join(CPU_WORKLOADS), help="comma list of " + ",".join(WORKLOADS)
    )
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds (>= 3 for min/median/max)")
    p.add_argument("--steps", type=int, default=None, help="override every workload's optimizer steps")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few steps, one round, no warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads in each child")
    p.add_argument("--impls", default="raw,ember,hf", help="subset of raw,ember,hf")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (all implementations)")
    p.add_argument("--compile", default="off", choices=("off", "on", "both"), help="torch.compile the model")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s, to report MFU")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="children run at once (default 1; 3 with --smoke, whose numbers are not measurements)",
    )
    p.add_argument(
        "--render", default=None, metavar="JSON", help="only rebuild the Markdown of a saved result"
    )
    p.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed warm-up run of each implementation"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a child is killed")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--tag", default=None, help="file stem (default: latest, or smoke with --smoke)")
    return p.parse_args(argv)


def hf_trainer_missing() -> str | None:
    """Why transformers' Trainer cannot run here, or None. Checked without importing it."""
    for module, hint in (
        ("transformers", "pip install transformers"),
        ("accelerate", "pip install accelerate"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"transformers Trainer skipped: `{module}` is not installed ({hint})"
    return None


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        # Idle OpenMP threads sleep instead of spinning, so they do not steal the other core.
        OMP_WAIT_POLICY="PASSIVE",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    # Users run with bytecode caches; without them every import recompiles ember's sources.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_child(
    impl: str, w: Workload, ns: argparse.Namespace, compiled: bool, workdir: Path
) -> dict[str, Any]:
    """Start one child, wait for it, and return its JSON plus the parent's own wall time."""
    out = workdir / f"{w.name}-{impl.replace(':', '_')}-{time.monotonic_ns()}.json"
    log = out.with_suffix(".log")
    cmd = [sys.executable, "-m", "bench.child", "--impl", impl, "--workload-json", json.dumps(w.to_dict())]
    cmd += ["--out", str(out), "--threads", str(ns.threads), "--device", ns.device]
    cmd += ["--bf16"] * ns.bf16 + ["--compile"] * compiled
    with open(log, "w") as sink:
        spawn = time.time()
        start = time.perf_counter()
        cmd += ["--spawn-time", repr(spawn)]
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                env=child_env(ns.threads),
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=ns.timeout,
                check=False,
            )
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        wall = time.perf_counter() - start
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"impl": impl, "ok": False}
    res.update(process_wall_s=wall, returncode=code)
    if not res.get("ok"):
        res.setdefault("error", log.read_text()[-3000:] or f"child exited with {code}")
    return res


def plan(ns: argparse.Namespace) -> list[Workload]:
    names = [n.strip() for n in ns.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {','.join(WORKLOADS)}")
    out = []
    for n in names:
        w = smoke(WORKLOADS[n]) if ns.smoke else WORKLOADS[n]
        out.append(with_steps(w, ns.steps) if ns.steps else w)
    return out


def impls_for(w: Workload, base: list[str]) -> list[str]:
    # Evaluation: both trainers also run the accumulate-all-logits path beside batch_eval_metrics.
    return base + [f"{i}:accum" for i in base if i != "raw"] if w.is_eval else base


def ratio_pairs(impls: list[str]) -> list[tuple[str, str]]:
    pairs = [("ember", other) for other in ("raw", "hf") if "ember" in impls and other in impls]
    if "ember:accum" in impls and "hf:accum" in impls:
        pairs.append(("ember:accum", "hf:accum"))
    return pairs


def machine_info(ns: argparse.Namespace) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "ember"], cwd=ROOT, capture_output=True, text=True
            ).stdout
        )
    except OSError:
        commit, dirty = "", False
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "threads": ns.threads,
        "OMP_WAIT_POLICY": "PASSIVE",
        "device": ns.device,
        "git_commit": commit + ("+dirty(ember/)" if dirty else ""),
        "loadavg_start": os.getloadavg(),
    }


def warm_up(impls: list[str], ns: argparse.Namespace, compiled: bool, workdir: Path) -> None:
    """One untimed tiny run per implementation: page cache and bytecode caches are warm for all."""
    for impl in impls:
        res = run_child(impl, smoke(WORKLOADS["a"]), ns, compiled, workdir)
        if not res.get("ok"):
            print(f"warm-up of {impl} failed:\n{res.get('error')}", file=sys.stderr)


def run_all(
    ns: argparse.Namespace, workloads: list[Workload], impls: list[str], workdir: Path
) -> list[dict[str, Any]]:
    """Every (workload, round, implementation) in interleaved order: w1 A B C, w1 A B C, ..., w2 ..."""
    runs = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[ns.compile]
    for compiled in modes:
        if not ns.no_warmup and not ns.smoke:
            warm_up(impls, ns, compiled, workdir)
        tasks = [(w, rep, impl) for w in workloads for rep in range(ns.reps) for impl in impls_for(w, impls)]

        def one(task: tuple[Workload, int, str], compiled: bool = compiled) -> dict[str, Any]:
            w, rep, impl = task
            name = w.name + ("+compile" if compiled else "")
            res = run_child(impl, w, ns, compiled, workdir)
            res.update(workload=name, rep=rep, is_eval=w.is_eval, tokens_per_step=w.tokens_per_step)
            report.derive(res, ns.peak_flops)
            status = f"{res.get('main_s', float('nan')):.2f}s" if res.get("ok") else "FAILED"
            print(f"[{name} round {rep + 1}/{ns.reps}] {impl:12s} {status}", flush=True)
            return res

        if ns.jobs > 1:
            with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
                runs += list(pool.map(one, tasks))
        else:
            runs += [one(t) for t in tasks]
    return runs


def write_results(ns: argparse.Namespace, payload: dict[str, Any], markdown: str) -> Path:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ns.tag or ("smoke" if ns.smoke else "latest")
    (out / f"{tag}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / f"{tag}.md").write_text(markdown)
    return out / f"{tag}.json"


def measure(ns: argparse.Namespace) -> dict[str, Any] | int:
    """Run every child; returns the payload saved as JSON (or an exit code if nothing can run)."""
    if importlib.util.find_spec("transformers") is None:
        print(
            "bench.compare needs transformers for the GPT-2 model: pip install transformers", file=sys.stderr
        )
        return 2
    impls = [i.strip() for i in ns.impls.split(",") if i.strip()]
    skipped = hf_trainer_missing() if "hf" in impls else None
    if skipped:
        print(skipped, file=sys.stderr)
        impls.remove("hf")
    workloads = plan(ns)
    machine = machine_info(ns)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ember-bench-") as tmp:
        runs = run_all(ns, workloads, impls, Path(tmp))
    machine.update(
        loadavg_end=os.getloadavg(),
        elapsed_s=time.perf_counter() - started,
        finished=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=next((r["torch_version"] for r in runs if r.get("torch_version")), None),
        transformers=next((r["transformers_version"] for r in runs if r.get("transformers_version")), None),
    )
    return {
        "machine": machine,
        "config": dict(vars(ns), impls=",".join(impls)),
        "workloads": {w.name: w.to_dict() for w in workloads},
        "notes": [skipped] if skipped else [],
        "runs": runs,
    }


def analyse(payload: dict[str, Any]) -> str:
    """Fill the payload's summary and notes from its runs; returns the Markdown report."""
    workloads = [Workload.from_dict(d) for d in payload["workloads"].values()]
    impls = payload["config"]["impls"].split(",")
    runs = payload["runs"]
    pairs = {
        r["workload"]: ratio_pairs(impls_for(w, impls))
        for w in workloads
        for r in runs
        if r["workload"].split("+")[0] == w.name
    }
    payload["summary"] = report.summarise(runs, pairs)
    skipped = [n for n in payload.get("notes", []) if n.startswith("transformers Trainer skipped")]
    payload["notes"] = (
        report.consistency_notes(payload["summary"], {w.name: w.seq for w in workloads}) + skipped
    )
    machine, threads = payload["machine"], payload["config"]["threads"]
    load = max(machine["loadavg_start"][0], machine["loadavg_end"][0])
    if load > threads + 0.5:
        payload["notes"].append(
            f"the machine was busy (load average up to {load:.1f} on {machine['cpu_count']} cores): "
            "wall-clock figures include waiting for a CPU; the CPU-time columns and ratios are the steadier "
            "measure"
        )
    return render(payload["config"], payload["machine"], workloads, payload["summary"], payload["notes"])


def main(argv: list[str] | None = None) -> int:
    ns = parse(argv)
    if ns.render:
        payload = json.loads(Path(ns.render).read_text())
        markdown = analyse(payload)
        Path(ns.render).write_text(json.dumps(payload, indent=1, default=str))
        Path(ns.render).with_suffix(".md").write_text(markdown)
        print(markdown)
        return 0
    if ns.smoke:
        ns.reps = 1
    if ns.jobs is None:
        ns.jobs = 3 if ns.smoke else 1
    payload = measure(ns)
    if isinstance(payload, int):
        return payload
    markdown = analyse(payload)
    path = write_results(ns, payload, markdown)
    print(markdown)
    print(f"results: {path} and {path.with_suffix('.md')}")
    return 0 if all(r.get("ok") for r in payload["runs"]) else 1


def render(
    cfg: dict[str, Any],
    machine: dict[str, Any],
    workloads: list[Workload],
    summary: dict[str, Any],
    notes: list[str],
) -> str:
    precision = "bf16" if cfg["bf16"] else "fp32"
    lines = [
        f"# ember vs raw PyTorch vs transformers Trainer ({machine.get('finished')})",
        "",
        f"- machine: {machine['cpu']} x{machine['cpu_count']}, {machine['platform']}, "
        f"python {machine['python']}",
        f"- torch {machine['torch']}, transformers {machine['transformers']}, threads {cfg['threads']}, "
        f"OMP_WAIT_POLICY=PASSIVE, device {cfg['device']}, {precision}, compile {cfg['compile']}",
        f"- ember at {machine['git_commit']}; {cfg['reps']} interleaved round(s)"
        f"{' (smoke)' if cfg['smoke'] else ''}"
        f"; load average {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}; "
        f"took {machine.get('elapsed_s', 0):.0f} s",
        "- figures are medians over rounds; see bench/README.md for what each one measures",
        "",
    ]
    for w in workloads:
        for name in (n for n in summary if n.split("+")[0] == w.name):
            lines += report.workload_section(name, w.title, w.is_eval, summary[name])
    lines += report.targets_section(summary)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
