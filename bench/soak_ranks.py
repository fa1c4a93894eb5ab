"""kill -9 soak across ranks: a 2-process DDP job under `torchrun --max-restarts`, any rank killed at
random moments, restarted by torchrun and resumed by ember's auto_resume (nothing in the script
asks for it); at the end the weights must equal an uninterrupted run's, bit for bit, and no
temporary folder may be left.

    python -m bench.soak --ranks 2 --kills 3      # (bench/soak.py hands --ranks N over to this)

The job is the tiny GPT-2 of the multi-process tests (gloo, CPU), 8 + 6 x kills optimizer steps,
saving every 2 steps with save_total_limit=2 (every save is followed by a rotation), sync or async
saves chosen at random per attempt. Each kill picks a rank at random, and a moment: once the
attempt has written 1-3 checkpoints past its start, plus up to `--window` seconds.
Reported: kills, restarts, the time from each kill to the restarted job training again, and the
time lost per kill (the soak's wall time minus the uninterrupted run's, per kill).
"""

from __future__ import annotations

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


def steps_for(kills: int) -> int:
    """Long enough that every kill lands after fresh progress (2-6 steps past the resume)."""
    return 8 + 6 * kills


def job(out: Path) -> None:
    """One attempt of the job (run by torchrun on every rank)."""
    import torch
    from safetensors.torch import save_file

    from ember import TrainerCallback
    from tests.strategy.worker import lm_state, lm_trainer

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    class Ready(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            path = out / f"ready-{attempt}-rank{rank}"
            path.with_suffix(".part").write_text(json.dumps({"pid": os.getpid(), "step": state.global_step}))
            os.replace(path.with_suffix(".part"), path)

    async_save = random.Random(attempt).random() < 0.5
    trainer = lm_trainer(
        str(out / "run"),
        callbacks=[Ready()],
        max_steps=int(os.environ["SOAK_STEPS"]),
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        save_async=async_save,
    )
    trainer.train()
    if rank == 0:
        state = lm_state(trainer)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "final.safetensors"))


def _torchrun(out: Path, restarts: int, steps: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["SOAK_STEPS"] = str(steps)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--max-restarts", str(restarts), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
        "-m", "bench.soak_ranks", "job", str(out),
    ]  # fmt: skip
    log = (out / "torchrun.log").open("wb")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _ready(
    out: Path, attempt: int, proc: subprocess.Popen[bytes], timeout: float = 600
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    paths = [out / f"ready-{attempt}-rank{r}" for r in (0, 1)]
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"attempt {attempt} never started training; see {out / 'torchrun.log'}")
        time.sleep(0.05)
    return [json.loads(p.read_text()) for p in paths]


def _newest(folder: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def soak(kills: int, seed: int, work: Path, window: float) -> dict[str, Any]:
    from safetensors.torch import load_file

    rng = random.Random(seed)
    ref, run = work / "reference", work / "soak"
    ref.mkdir(parents=True)
    run.mkdir(parents=True)
    start = time.monotonic()
    steps = steps_for(kills)
    proc = _torchrun(ref, 0, steps)
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {ref / 'torchrun.log'}")
    reference_s = time.monotonic() - start

    start = time.monotonic()
    proc = _torchrun(run, kills, steps)
    events: list[dict[str, Any]] = []
    for attempt in range(kills):
        ranks = _ready(run, attempt, proc)
        if attempt:
            events[-1]["back_training_s"] = round(time.monotonic() - events[-1]["_at"], 2)
            events[-1]["resumed_step"] = ranks[0]["step"]
        # Kill once the attempt has saved 1-3 checkpoints past its start, up to `window` s later:
        # in a step, a (sync or async) save or a rotation, wherever that moment falls.
        target = ranks[0]["step"] + 2 * rng.randint(1, 3)
        while _newest(run / "run") < target and proc.poll() is None:  # rotation removes older ones
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, window))
        victim = rng.randrange(2)
        if proc.poll() is not None:
            break  # the job finished before this kill
        try:
            os.kill(ranks[victim]["pid"], signal.SIGKILL)
        except ProcessLookupError:
            break
        events.append({"attempt": attempt, "rank": victim, "_at": time.monotonic()})
    if events:
        ranks = _ready(run, len(events), proc)
        events[-1]["back_training_s"] = round(time.monotonic() - events[-1]["_at"], 2)
        events[-1]["resumed_step"] = ranks[0]["step"]
    code = proc.wait()
    soak_s = time.monotonic() - start
    for e in events:
        e.pop("_at")
    got, want = load_file(str(run / "final.safetensors")), load_file(str(ref / "final.safetensors"))
    exact = got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)
    leftovers = sorted(str(p.relative_to(run)) for p in (run / "run").glob("*.tmp"))
    return {
        "ranks": 2,
        "strategy": "ddp (gloo, CPU)",
        "steps": steps,
        "kills": len(events),
        "restarts": len(events),
        "exit_code": code,
        "final_weights_bit_exact": exact,
        "temporary_folders_left": leftovers,
        "reference_s": round(reference_s, 1),
        "soak_s": round(soak_s, 1),
        "time_lost_per_kill_s": round((soak_s - reference_s) / max(len(events), 1), 1),
        "kill_to_training_again_s": [e["back_training_s"] for e in events],
        "events": events,
        "seed": seed,
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["job"]:
        job(Path(argv[1]))
        return
    raise SystemExit(
        "usage: python -m bench.soak --ranks 2 [--kills N]  (or: python -m bench.soak_ranks job OUT)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
