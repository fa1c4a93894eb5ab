"""Start N real processes the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
each running `python -m <module> ARGS`, and wait for all of them under a hard timeout.

Plain subprocesses rather than torch.multiprocessing: a test can kill one rank, the processes run
their atexit teardown, and a hung collective becomes a test failure with every rank's output.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Rank:
    rank: int
    returncode: int | None
    output: str


def rank_env(rank: int, world: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


def start(args: list[str], nproc: int = 2, env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    port = free_port()
    procs = []
    for r in range(nproc):
        # Output goes to a file, not a pipe: a rank blocked on a full pipe would hang its peers.
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by _output()
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=rank_env(r, nproc, port, env),
            cwd=str(REPO),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        proc.log = log  # type: ignore[attr-defined]
        procs.append(proc)
    return procs


def _output(proc: subprocess.Popen[str]) -> str:
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    text = log.read()
    log.close()
    return text


def wait(procs: list[subprocess.Popen[str]], timeout: float) -> list[Rank]:
    """Wait for every process; past `timeout` seconds kill them all and report them as hung (None)."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return [Rank(rank, code, _output(proc)) for rank, (code, proc) in enumerate(zip(codes, procs))]


def run(
    args: list[str], nproc: int = 2, timeout: float = 120, env: dict[str, str] | None = None
) -> list[Rank]:
    return wait(start(args, nproc, env), timeout)


def check(ranks: list[Rank]) -> None:
    """Fail with every rank's output unless all exited 0."""
    if all(r.returncode == 0 for r in ranks):
        return
    report = "\n".join(f"--- rank {r.rank} (exit {r.returncode}) ---\n{r.output[-6000:]}" for r in ranks)
    raise AssertionError(f"distributed job failed:\n{report}")
