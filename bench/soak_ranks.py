"""kill -9 soak across ranks: a DDP or FSDP2 job of 2 or 4 gloo processes under `torchrun
--max-restarts`, one rank killed at a chosen kind of moment, restarted by torchrun and resumed by
ember's auto_resume (nothing in the script asks for it); at the end the weights must equal an
uninterrupted run's, bit for bit, every checkpoint left must check out, and no temporary folder
may be left.

    python -m bench.soak --ranks 2 --kills 30                    # DDP (the default for 2 ranks)
    python -m bench.soak --ranks 4 --kills 30                    # FSDP2, sharded (DCP) checkpoints
    python -m bench.soak --ranks 2 --strategy fsdp2 --kills 4    # any ranks x strategy

The job is the tiny GPT-2 of the multi-process tests (gloo, CPU), saving every 2 steps with
save_total_limit=2, so every save after the first two is followed by a rotation (rank 0 deletes
the oldest checkpoint). Each kill aims at one of four moments, in turn: a training step (forward,
backward, optimizer update), a sync save, an async save (the write on the background thread), a
rotation. The attempt's save mode (sync or async) is planned for its target. To aim, every rank
appends timestamped begin/end records of its phases to `phases-ATTEMPT-rankR.log` (unbuffered
appends, so what a killed process wrote is on disk); the soak reads them while the job runs and
kills the chosen rank (any rank, at random) once the target phase has begun. Saves and rotations
are widened by the job (`--slow-save`, `--slow-rotate` seconds of sleep inside the write and
between a rotation's rename and its removal) so a kill can land in them; the uninterrupted
reference run sleeps the same, so the comparison of wall times is fair.

Where a kill landed is read afterwards from the same records, never from the intent: the phases
the killed rank had open when its log stops (its own location), and the phases any rank had open
at the moment of the kill (the job's location, which is how a kill of rank 1 while rank 0 rotates
counts as "in a rotation"). Reported: kills, restarts, locations, the steps redone, the time from
each kill to the restarted job training again, and the time lost per kill (the soak's wall time
minus the uninterrupted run's, per kill).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# What a kill aims at, and where the evidence says it landed (most specific first: an async
# write overlaps the steps that run beside it, and a rotation runs inside a save).
TARGETS = ("step", "sync save", "async save", "rotation")
LOCATIONS = ("rotation", "async save", "sync save", "step", "between steps")
_PHASE_LOCATION = {
    "rotation": "rotation",
    "save-async": "async save",
    "save-sync": "sync save",
    "step": "step",
}
STRATEGIES = ("ddp", "fsdp2")


def steps_for(kills: int) -> int:
    """Enough steps that the job is still running at the last kill: each attempt is killed at most
    4 steps past its resume step (6 in the first, whose first rotation comes at step 6)."""
    return 10 + 4 * kills


# -- the job (run by torchrun on every rank) ---------------------------------------------------------


class PhaseLog:
    """Begin/end records of this process's phases, one line each: `TIME begin|end PHASE STEP`.

    Written with O_APPEND and no buffer, so every record is in the file the moment `mark` returns
    and a kill -9 loses nothing written before it; records from two threads never interleave."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def mark(self, what: str, phase: str, step: int) -> None:
        os.write(self.fd, f"{time.time():.6f} {what} {phase} {step}\n".encode())


def _instrument(log: PhaseLog, save_async: bool, slow_save: float, slow_rotate: float) -> None:
    """Record saves and rotations, and widen them (bench-side wrappers, in the job process only)."""
    from ember.checkpoint import rotation, training
    from ember.strategy.multi import MultiProcess

    phase = "save-async" if save_async else "save-sync"
    current = {"step": 0}
    protocol = MultiProcess._checkpoint_protocol

    def recorded_protocol(self, io, final_dir, steps, after):  # type: ignore[no-untyped-def]
        step = int(Path(final_dir).name.split("-")[1])
        current["step"] = step
        log.mark("begin", phase, step)
        protocol(self, io, final_dir, steps, after)
        log.mark("end", phase, step)

    MultiProcess._checkpoint_protocol = recorded_protocol  # type: ignore[method-assign]

    write_snapshot = training.write_snapshot

    def slow_write(snap, folder):  # type: ignore[no-untyped-def]
        write_snapshot(snap, folder)
        time.sleep(slow_save)  # inside checkpoint-N.tmp's write, before the manifest and rename

    training.write_snapshot = slow_write

    delete = rotation.delete_checkpoint
    fsync_dir = rotation.fsync_dir

    def recorded_delete(path):  # type: ignore[no-untyped-def]
        log.mark("begin", "rotation", current["step"])
        delete(path)
        log.mark("end", "rotation", current["step"])

    def slow_fsync(path):  # type: ignore[no-untyped-def]
        fsync_dir(path)
        time.sleep(slow_rotate)  # between the rename to checkpoint-N.deleting.tmp and its removal

    rotation.delete_checkpoint = recorded_delete
    rotation.fsync_dir = slow_fsync


def job(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from ember import TrainerCallback
    from tests.strategy.worker import lm_state, lm_trainer

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    plan = json.loads((out / "plan.json").read_text())
    save_async = bool(plan["attempts"][attempt]["save_async"]) if attempt < len(plan["attempts"]) else False
    log = PhaseLog(out / f"phases-{attempt}-rank{rank}.log")
    _instrument(log, save_async, plan["slow_save"], plan["slow_rotate"])

    class Phases(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            path = out / f"ready-{attempt}-rank{rank}"
            info = {"pid": os.getpid(), "step": state.global_step, "save_async": save_async}
            path.with_suffix(".part").write_text(json.dumps(info))
            os.replace(path.with_suffix(".part"), path)

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            log.mark("begin", "step", state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            log.mark("end", "step", state.global_step)

    trainer = lm_trainer(
        str(out / "run"),
        callbacks=[Phases()],
        fsdp=plan["strategy"] == "fsdp2",
        max_steps=plan["steps"],
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        save_async=save_async,
    )
    trainer.train()
    state = lm_state(trainer)  # every rank: gathering a sharded model is a collective
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "final.safetensors"))


# -- reading the evidence ----------------------------------------------------------------------------

Record = tuple[float, str, str, int]  # (time, "begin" | "end", phase, step)


def parse_phases(text: str) -> list[Record]:
    """The records of a phase log; a torn last line (the process died inside `write`) is dropped."""
    out = []
    for line in text.split("\n"):
        parts = line.split()
        if len(parts) == 4 and parts[1] in ("begin", "end"):
            try:
                out.append((float(parts[0]), parts[1], parts[2], int(parts[3])))
            except ValueError:
                continue
    return out


def open_phases(records: Iterable[Record], at: float | None = None) -> list[str]:
    """Phases begun and not yet ended: at the end of the records, or at time `at`."""
    depth: Counter[str] = Counter()
    for t, what, phase, _step in records:
        if at is not None and t > at:
            break
        depth[phase] += 1 if what == "begin" else -1
    return sorted(p for p, n in depth.items() if n > 0)


def location(phases: Iterable[str]) -> str:
    """Where a kill landed, given the open phases: the most specific one."""
    found = {_PHASE_LOCATION[p] for p in phases if p in _PHASE_LOCATION}
    return next((loc for loc in LOCATIONS if loc in found), "between steps")


def last_step(records: Sequence[Record]) -> int:
    """The last step a process had begun."""
    return max((step for _t, what, phase, step in records if phase == "step" and what == "begin"), default=0)


def classify(logs: dict[int, list[Record]], victim: int, killed_at: float) -> dict[str, Any]:
    """Where one kill landed: the victim's open phases when its log stops (it wrote nothing after
    the kill), and every rank's open phases at the moment of the kill."""
    own = open_phases(logs[victim])
    job = sorted({p for records in logs.values() for p in open_phases(records, at=killed_at)} | set(own))
    return {
        "landed": location(job),
        "landed_on_victim": location(own),
        "victim_open_phases": own,
        "job_open_phases": job,
        "victim_last_step": last_step(logs[victim]),
    }


# -- the soak ---------------------------------------------------------------------------------------


def make_plan(kills: int, ranks: int, seed: int) -> list[dict[str, Any]]:
    """Per attempt: the target moment (the four in turn, shuffled per round), the rank to kill (at
    random), the save mode (async for an async-save target, sync for sync saves and steps, either
    for rotations), and how many saves past its resume the attempt runs before the kill (1-2)."""
    rng = random.Random(seed)
    targets: list[str] = []
    while len(targets) < kills:
        round_ = list(TARGETS)
        rng.shuffle(round_)
        targets += round_
    plan = []
    for target in targets[:kills]:
        save_async = target == "async save" or (target == "rotation" and rng.random() < 0.5)
        plan.append(
            {
                "target": target,
                "victim": rng.randrange(ranks),
                "save_async": save_async,
                "saves": rng.randint(1, 2),
            }
        )
    return plan


class Tail:
    """The records appended to a phase log so far (read as it grows)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, ""
        self.records: list[Record] = []

    def poll(self) -> list[Record]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.records
        self.offset += len(chunk)
        text = self.partial + chunk.decode()
        text, _, self.partial = text.rpartition("\n")
        self.records += parse_phases(text)
        return self.records


def _began(records: Sequence[Record], phases: Iterable[str], step: int) -> bool:
    names = set(phases)
    return any(what == "begin" and phase in names and s >= step for _t, what, phase, s in records)


def _aim(
    target: str, victim_tail: Tail, rank0_tail: Tail, resumed: int, saves: int, proc: subprocess.Popen[bytes]
) -> bool:
    """Wait until the target phase has begun far enough past the resume; False if the job ended."""
    save = resumed + 2 * saves  # the save (a step divisible by 2) this attempt is killed in or around
    while proc.poll() is None:
        if target in ("sync save", "async save"):
            if _began(victim_tail.poll(), ("save-sync", "save-async"), save):
                return True
        elif target == "rotation":
            if _began(rank0_tail.poll(), ("rotation",), save):
                return True
        else:  # a step, once no save is open on the victim (sync saves: the steps wait for them)
            records = victim_tail.poll()
            if _began(records, ("step",), save - 1) and open_phases(records) == ["step"]:
                return True
        time.sleep(0.005)
    return False


def _torchrun(out: Path, restarts: int, ranks: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
        "--max-restarts", str(restarts), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
        "-m", "bench.soak_ranks", "job", str(out),
    ]  # fmt: skip
    log = (out / "torchrun.log").open("wb")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _ready(
    out: Path, attempt: int, ranks: int, proc: subprocess.Popen[bytes], timeout: float = 900
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    paths = [out / f"ready-{attempt}-rank{r}" for r in range(ranks)]
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"attempt {attempt} never started training; see {out / 'torchrun.log'}")
        time.sleep(0.05)
    return [json.loads(p.read_text()) for p in paths]


def _write_plan(
    folder: Path, strategy: str, steps: int, attempts: list[dict[str, Any]], slow: tuple[float, float]
) -> None:
    plan = {
        "strategy": strategy,
        "steps": steps,
        "attempts": attempts,
        "slow_save": slow[0],
        "slow_rotate": slow[1],
    }
    (folder / "plan.json").write_text(json.dumps(plan, indent=1))


def _logs(run: Path, attempt: int, ranks: int) -> dict[int, list[Record]]:
    out = {}
    for r in range(ranks):
        path = run / f"phases-{attempt}-rank{r}.log"
        out[r] = parse_phases(path.read_text()) if path.exists() else []
    return out


def soak(
    kills: int,
    seed: int,
    work: Path,
    window: float,
    ranks: int = 2,
    strategy: str = "ddp",
    steps: int | None = None,
    slow_save: float = 0.3,
    slow_rotate: float = 0.3,
) -> dict[str, Any]:
    """Run the reference and the soak; `window`: the kill comes up to this many seconds after its
    target phase began (capped at the widened save or rotation, so it lands inside them)."""
    from safetensors.torch import load_file

    from ember.checkpoint import sorted_checkpoints, verify_checkpoint

    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    rng = random.Random(seed + 1)
    steps = steps or steps_for(kills)
    plan = make_plan(kills, ranks, seed)
    ref, run = work / "reference", work / "soak"
    ref.mkdir(parents=True)
    run.mkdir(parents=True)
    _write_plan(ref, strategy, steps, [], (slow_save, slow_rotate))
    start = time.monotonic()
    proc = _torchrun(ref, 0, ranks)
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {ref / 'torchrun.log'}")
    reference_s = time.monotonic() - start

    _write_plan(run, strategy, steps, plan, (slow_save, slow_rotate))
    start = time.monotonic()
    proc = _torchrun(run, kills, ranks)
    events: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]  # the machine is shared: the restart times depend on what else runs
    for attempt, aim in enumerate(plan):
        ready = _ready(run, attempt, ranks, proc)
        load.append(os.getloadavg()[0])
        if attempt:
            events[-1]["kill_to_training_again_s"] = round(time.monotonic() - events[-1].pop("_at"), 2)
            events[-1]["resumed_step"] = ready[0]["step"]
        victim = aim["victim"]
        tails = {r: Tail(run / f"phases-{attempt}-rank{r}.log") for r in {0, victim}}
        if not _aim(aim["target"], tails[victim], tails[0], ready[0]["step"], aim["saves"], proc):
            break  # the job finished before this kill
        cap = {"step": 0.02, "rotation": slow_rotate / 2}.get(aim["target"], slow_save / 2)
        time.sleep(rng.uniform(0.0, min(window, cap)))
        killed_at = time.time()
        try:
            os.kill(ready[victim]["pid"], signal.SIGKILL)
        except ProcessLookupError:
            break
        event = {
            "attempt": attempt,
            "rank": victim,
            "target": aim["target"],
            "save_async": ready[0]["save_async"],
        }
        events.append(
            {**event, "from_step": ready[0]["step"], "_at": time.monotonic(), "_killed_at": killed_at}
        )
    if events and "_at" in events[-1]:
        ready = _ready(run, len(events), ranks, proc)
        events[-1]["kill_to_training_again_s"] = round(time.monotonic() - events[-1].pop("_at"), 2)
        events[-1]["resumed_step"] = ready[0]["step"]
    code = proc.wait()
    soak_s = time.monotonic() - start
    load.append(os.getloadavg()[0])
    attempts = sum(1 for _ in run.glob("ready-*-rank0"))
    for e in events:
        e.update(classify(_logs(run, e["attempt"], ranks), e["rank"], e.pop("_killed_at")))
        e["steps_redone"] = max(e["victim_last_step"] - e["resumed_step"], 0)
    problems = []
    final = run / "final.safetensors"
    exact = False
    if final.exists():
        got, want = load_file(str(final)), load_file(str(ref / "final.safetensors"))
        exact = got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)
    if not exact:
        problems.append(
            "the final weights differ from the uninterrupted run" if final.exists() else "no final weights"
        )
    if code != 0:
        problems.append(f"torchrun exited with {code}; see {run / 'torchrun.log'}")
    leftovers = sorted(p.name for p in (run / "run").iterdir() if p.name.endswith(".tmp"))
    problems += [f"left behind: {p}" for p in leftovers]
    for folder in sorted_checkpoints(run / "run"):
        reason = verify_checkpoint(folder, deep=True)
        if reason is not None:
            problems.append(f"{folder.name} does not check out: {reason}")
    # The scratch folder goes away with the soak: keep what torchrun saw when something went wrong.
    log_tail = (run / "torchrun.log").read_text(errors="replace")[-4000:] if problems else ""
    landed = Counter(e["landed"] for e in events)
    on_victim = Counter(e["landed_on_victim"] for e in events)
    return {
        "ranks": ranks,
        "strategy": {"ddp": "ddp (gloo, CPU)", "fsdp2": "fsdp2 (gloo, CPU), sharded DCP checkpoints"}[
            strategy
        ],
        "steps": steps,
        "kills": len(events),
        "restarts": attempts - 1,
        "kills_per_rank": {str(r): sum(e["rank"] == r for e in events) for r in range(ranks)},
        "kills_aimed": {t: sum(e["target"] == t for e in events) for t in TARGETS},
        "kills_landed": {loc: landed[loc] for loc in LOCATIONS},
        "kills_landed_on_victim": {loc: on_victim[loc] for loc in LOCATIONS},
        "exit_code": code,
        "final_weights_bit_exact": exact,
        "temporary_folders_left": leftovers,
        "checkpoints_left": [p.name for p in sorted_checkpoints(run / "run")],
        "reference_s": round(reference_s, 1),
        "soak_s": round(soak_s, 1),
        "time_lost_per_kill_s": round((soak_s - reference_s) / max(len(events), 1), 1),
        "kill_to_training_again_s_median": _median([e["kill_to_training_again_s"] for e in events]),
        "steps_redone_per_kill_mean": round(sum(e["steps_redone"] for e in events) / max(len(events), 1), 2),
        "load_avg_1min_during_soak": {"mean": round(sum(load) / len(load), 1), "max": round(max(load), 1)},
        "cpus": os.cpu_count(),
        "slow_save_s": slow_save,
        "slow_rotate_s": slow_rotate,
        "seed": seed,
        "events": events,
        "problems": problems,
        **({"torchrun_log_tail": log_tail} if log_tail else {}),
    }


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else round((s[mid - 1] + s[mid]) / 2, 2)


def markdown(summary: dict[str, Any], command: str) -> str:
    s = summary
    lines = [
        f"# kill -9 soak across ranks: {s['ranks']} processes, {s['strategy']}",
        "",
        f"`{command}`",
        "",
        f"- kills: {s['kills']} (per rank: {s['kills_per_rank']}), torchrun restarts: {s['restarts']}, "
        f"exit code {s['exit_code']}",
        f"- final weights bit-exact with the uninterrupted run: {s['final_weights_bit_exact']}; "
        f"temporary folders left: {len(s['temporary_folders_left'])}; "
        f"checkpoints left: {', '.join(s['checkpoints_left'])}",
        f"- {s['steps']} steps, saves every 2 (save_total_limit=2), widened by {s['slow_save_s']} s "
        f"per write and {s['slow_rotate_s']} s per rotation in both runs",
        f"- wall: uninterrupted {s['reference_s']} s, soak {s['soak_s']} s: **{s['time_lost_per_kill_s']} s "
        f"lost per kill**; kill to training again (median) {s['kill_to_training_again_s_median']} s; "
        f"steps redone per kill (mean) {s['steps_redone_per_kill_mean']}",
        f"- machine: {s['cpus']} CPUs shared with other jobs; 1-minute load average during the soak: mean "
        f"{s['load_avg_1min_during_soak']['mean']}, max {s['load_avg_1min_during_soak']['max']}",
        "",
        "Where the kills landed, from the phase records (not from the aim):",
        "",
        "| location | aimed | landed (any rank at the kill) | landed (the killed rank itself) |",
        "|---|---|---|---|",
    ]
    for loc in LOCATIONS:
        aimed = s["kills_aimed"].get(loc, "")
        lines.append(f"| {loc} | {aimed} | {s['kills_landed'][loc]} | {s['kills_landed_on_victim'][loc]} |")
    lines += ["", "Problems: " + ("; ".join(s["problems"]) if s["problems"] else "none"), ""]
    lines += ["| attempt | rank | aimed | landed | killed rank's open phases | from step | killed in step | "
              "resumed at | back training (s) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in s["events"]:
        lines.append(
            f"| {e['attempt']} | {e['rank']} | {e['target']} | {e['landed']} | "
            f"{', '.join(e['victim_open_phases']) or '-'} | {e['from_step']} | {e['victim_last_step']} | "
            f"{e['resumed_step']} | {e['kill_to_training_again_s']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if argv[:1] == ["job"]:
        job(Path(argv[1]))
        return
    raise SystemExit(
        "usage: python -m bench.soak --ranks 2|4 [--strategy ddp|fsdp2] [--kills N]  "
        "(or: python -m bench.soak_ranks job OUT)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
