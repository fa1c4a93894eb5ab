"""One writer per output_dir: the run lock, in one process and between real training processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.checkpoint import remove_stale_tmp, verify_checkpoint
from ember.checkpoint.lock import LOCK_NAME, OutputDirLockedError, RunLock, held_elsewhere
from tests.resume_job import make_trainer

REPO = Path(__file__).resolve().parents[2]


def test_second_lock_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        # Read through the lock: opening the file again in this process would drop a record lock.
        record = lock.holder()
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        # A second lock in the same process (another Trainer on the folder) is refused as well.
        with pytest.raises(OutputDirLockedError) as info:
            RunLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "another output_dir" in message and "stop the other run" in message
    assert not (tmp_path / LOCK_NAME).exists()  # released and removed
    with RunLock(tmp_path):  # free again
        pass


def test_lock_of_a_dead_run_is_taken_over_and_said_so(tmp_path: Path, caplog) -> None:
    # What kill -9 leaves: the file and its record, but no lock (it died with the process).
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "old-node", "started": 0}))
    with caplog.at_level("INFO"), RunLock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert "Took over the lock" in caplog.text and "pid 999999 on host old-node" in caplog.text


def test_train_releases_the_lock_after_an_exception(tmp_path: Path) -> None:
    trainer = make_trainer(str(tmp_path), dataloader_num_workers=0, max_steps=2)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    trainer.training_step = boom  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not (tmp_path / LOCK_NAME).exists()
    make_trainer(str(tmp_path), dataloader_num_workers=0, max_steps=2).train()


def test_train_is_refused_while_another_holds_the_lock(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-7.tmp").mkdir(parents=True)  # another run's save in progress
    with RunLock(tmp_path):
        trainer = make_trainer(str(tmp_path), dataloader_num_workers=0, max_steps=2)
        with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()}"):
            trainer.train()
    assert trainer.state.global_step == 0
    assert (tmp_path / "checkpoint-7.tmp").is_dir()  # the refused run cleaned nothing


def test_only_the_lock_holder_removes_temporary_folders(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-4.tmp").mkdir()
    probe = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, env=_env()
    )
    try:
        assert probe.stdout is not None and probe.stdout.readline().strip() == b"locked"
        assert held_elsewhere(tmp_path)
        assert remove_stale_tmp(tmp_path) == []
        assert (tmp_path / "checkpoint-4.tmp").is_dir()
    finally:
        probe.kill()
        probe.wait()
    assert not held_elsewhere(tmp_path)  # died with the process
    assert remove_stale_tmp(tmp_path) == [tmp_path / "checkpoint-4.tmp"]


_HOLD_LOCK = """
import sys, time
from ember.checkpoint.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _job(out: Path, result: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.resume_job", str(out), str(result), *extra],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _manifests(out: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sorted(out.glob("checkpoint-*/manifest.json"))}


def test_two_processes_on_one_output_dir(tmp_path: Path) -> None:
    out, release = tmp_path / "run", tmp_path / "go"
    first = _job(out, tmp_path / "first.safetensors", "--pause-at", "5", "--release", str(release))
    _wait_for(Path(f"{release}.paused"), first)  # the first run holds the lock, checkpoints 2 and 4 exist
    before = _manifests(out)
    assert set(before) == {"checkpoint-2", "checkpoint-4"}

    second = _job(out, tmp_path / "second.safetensors")
    assert second.wait(timeout=180) != 0
    output = second.stdout.read().decode() if second.stdout else ""
    assert "OutputDirLockedError" in output
    assert f"pid {first.pid} on host {socket.gethostname()}" in output
    assert _manifests(out) == before  # the refused run touched nothing

    release.write_text("go")
    assert first.wait(timeout=300) == 0, first.stdout.read().decode() if first.stdout else ""
    after = _manifests(out)
    assert {k: after[k] for k in before} == before
    assert sorted(after, key=lambda n: int(n.split("-")[1])) == [f"checkpoint-{s}" for s in range(2, 19, 2)]
    assert all(verify_checkpoint(out / name) is None for name in after)
    assert not (out / LOCK_NAME).exists()

    # Once the first has exited, a new run takes the lock (it resumes at the end and finishes).
    third = _job(out, tmp_path / "third.safetensors")
    assert third.wait(timeout=300) == 0, third.stdout.read().decode() if third.stdout else ""


def test_the_lock_holder_finishes_what_a_killed_run_left(tmp_path: Path, caplog) -> None:
    for name in ("checkpoint-2.deleting.tmp", "checkpoint-4.tmp", "checkpoint-6.replaced.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    with caplog.at_level("INFO"):
        make_trainer(str(tmp_path), dataloader_num_workers=0, max_steps=1, save_strategy="no").train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.jsonl"]
    assert "left by an interrupted delete" in caplog.text and "left by an interrupted write" in caplog.text
