"""kill -9 soak: kill a training job at random moments many times, resume each time, compare.

    python -m bench.soak                       # 24 kills, seed 0, results to bench/results/soak.json
    python -m bench.soak --kills 3 --out DIR   # a quick look
    python -m bench.soak --ranks 2 --kills 30  # across ranks under torchrun (bench/soak_ranks.py);
    python -m bench.soak --ranks 4 --kills 30  # 4 ranks: FSDP2 (--strategy ddp|fsdp2 to choose)

The job is `tests/resume_job.py` (dropout, noisy data drawn in two dataloader workers, GA=2) for
20 epochs (120 optimizer steps), saving every 2 steps with save_total_limit=2, so every save is
followed by a rotation. Each start picks sync or async saves at random (`save_async=True`, the
write runs on a background thread), and the job slows its saves (0.15 s) and the moment between
a rotation's rename and its removal (0.1 s), so kills land in steps, in saves, in async writes
and in rotations. After each kill the soak checks that every `checkpoint-N` left is complete
(deep sha256 check) and that its model and optimizer tensors equal, bit for bit, those of the
same step of an uninterrupted reference run (which keeps all its checkpoints). At the end the
final weights and optimizer state must equal the reference's, and no temporary folder may be
left. Where each kill landed is read from what it left behind: a `checkpoint-N.tmp` (a write),
a `checkpoint-N.deleting.tmp` (a rotation).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _job(out: Path, result: Path, ready: Path, *extra: str, rotate: bool = True) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tests.resume_job", str(out), str(result), "--epochs", "20"]
    cmd += [*(["--save-total-limit", "2"] if rotate else []), "--ready", str(ready), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, timeout: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise TimeoutError("the job never started training")
        time.sleep(0.02)
    return True


def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out = {}
    for name in ("model.safetensors", "optimizer.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(folder / name)).items()})
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_folder(run: Path, ref: Path, seen: dict[str, bool]) -> list[str]:
    """Problems with the checkpoints in `run`; `seen` records each compared checkpoint's result."""
    from ember.checkpoint import sorted_checkpoints, verify_checkpoint

    problems = []
    for folder in sorted_checkpoints(run):
        reason = verify_checkpoint(folder, deep=True)
        if reason is not None:
            problems.append(f"{folder.name} is torn: {reason}")
            continue
        exact = _same(_tensors(folder), _tensors(ref / folder.name))
        seen[folder.name] = seen.get(folder.name, True) and exact
        if not exact:
            problems.append(f"{folder.name} differs from the uninterrupted run")
    return problems


def soak(kills: int, seed: int, work: Path, window: float) -> dict[str, Any]:
    start = time.monotonic()
    ref, run = work / "ref", work / "run"
    slow = ("--slow-save", "0.15", "--step-sleep", "0.02", "--slow-rotate", "0.1")
    reference = _job(ref, work / "ref.safetensors", work / "ref.ready", rotate=False)
    rng = random.Random(seed)
    landed = {"in a sync write": 0, "in an async write": 0, "in a rotation": 0, "elsewhere": 0}
    problems: list[str] = []
    compared: dict[str, bool] = {}
    done = resumes = 0
    async_starts = 0
    if reference.wait(timeout=1800) != 0:
        raise RuntimeError(reference.stdout.read().decode() if reference.stdout else "reference failed")
    while done < kills:
        ready = work / f"ready-{done}"
        use_async = rng.random() < 0.5
        async_starts += use_async
        proc = _job(run, work / "run.safetensors", ready, *slow, *(["--save-async"] if use_async else []))
        if not _wait_ready(proc, ready):
            raise RuntimeError(
                "the job ended before it was killed " + (proc.stdout.read().decode() if proc.stdout else "")
            )
        resumes += int(ready.read_text()) > 0
        time.sleep(rng.uniform(0.0, window))
        if proc.poll() is not None:
            raise RuntimeError(f"the job finished after {done} kills; make it longer or the window shorter")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done += 1
        names = [p.name for p in run.iterdir()]
        if any(n.endswith(".deleting.tmp") for n in names):
            landed["in a rotation"] += 1
        elif any(n.endswith(".tmp") for n in names):
            landed["in an async write" if use_async else "in a sync write"] += 1
        else:
            landed["elsewhere"] += 1
        problems += [f"after kill {done}: {p}" for p in _check_folder(run, ref, compared)]
    ready = work / "ready-final"
    final = _job(run, work / "run.safetensors", ready)
    if final.wait(timeout=1800) != 0:
        raise RuntimeError(final.stdout.read().decode() if final.stdout else "the final run failed")
    resumes += int(ready.read_text()) > 0
    problems += _check_folder(run, ref, compared)
    leftovers = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name == ".ember.lock")
    if leftovers:
        problems.append(f"left behind: {leftovers}")
    from safetensors.torch import load_file

    final_exact = _same(load_file(str(work / "run.safetensors")), load_file(str(work / "ref.safetensors")))
    if not final_exact:
        problems.append("the final state differs from the uninterrupted run")
    return {
        "kills": done,
        "seed": seed,
        "kill_window_s": window,
        "starts_with_save_async": async_starts,
        "kills_landed": landed,
        "resumes": resumes,
        "checkpoints_compared": len(compared),
        "all_checkpoints_exact": all(compared.values()),
        "final_exact": final_exact,
        "leftovers": leftovers,
        "problems": problems,
        "wall_s": round(time.monotonic() - start, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=float, default=1.2, help="kill up to this many seconds after start")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="2 or 4: a job of that many processes under torchrun --max-restarts (bench/soak_ranks.py)",
    )
    p.add_argument(
        "--strategy",
        choices=("ddp", "fsdp2"),
        default=None,
        help="with --ranks: ddp (the default for 2 ranks) or fsdp2 (the default for 4)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="with --ranks: optimizer steps (default from --kills)"
    )
    p.add_argument(
        "--slow-save", type=float, default=0.3, help="with --ranks: seconds added inside each write"
    )
    p.add_argument(
        "--slow-rotate", type=float, default=0.3, help="with --ranks: seconds added inside each rotation"
    )
    opts = p.parse_args(argv)
    if opts.ranks not in (1, 2, 4):
        p.error("--ranks: 1 (one process), 2 or 4 (torchrun)")
    if opts.strategy is not None and opts.ranks == 1:
        p.error("--strategy goes with --ranks 2 or 4")
    import tempfile

    name, report = "soak", None
    with tempfile.TemporaryDirectory(dir=opts.work) as scratch:
        if opts.ranks == 1:
            summary = soak(opts.kills, opts.seed, Path(scratch), opts.window)
        else:
            from . import soak_ranks

            strategy = opts.strategy or ("ddp" if opts.ranks == 2 else "fsdp2")
            summary = soak_ranks.soak(
                opts.kills,
                opts.seed,
                Path(scratch),
                opts.window,
                ranks=opts.ranks,
                strategy=strategy,
                steps=opts.steps,
                slow_save=opts.slow_save,
                slow_rotate=opts.slow_rotate,
            )
            # The 2-rank DDP soak keeps the name it always had; the others say their strategy.
            name = f"soak-ranks{opts.ranks}" + (
                "" if (opts.ranks, strategy) == (2, "ddp") else f"-{strategy}"
            )
            command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
            report = soak_ranks.markdown(summary, command)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    if report is not None:
        (out / f"{name}.md").write_text(report)
    print(json.dumps(summary, indent=1))
    if summary["problems"]:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
