"""A rank that dies must make the others fail fast with a clear message, not hang."""

from __future__ import annotations

import time

from tests.strategy import launch


def test_killed_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    start = time.monotonic()
    ranks = launch.run(["-m", "tests.strategy.worker", "die", str(tmp_path)], timeout=120)
    elapsed = time.monotonic() - start
    killed, survivor = ranks[1], ranks[0]
    assert killed.returncode == -9, killed.output[-3000:]
    assert survivor.returncode not in (0, None), survivor.output[-3000:]
    assert "Another rank most likely died" in survivor.output, survivor.output[-3000:]
    assert elapsed < 90  # ddp_timeout is 30 s; a dead peer's socket closes at once


def test_a_stuck_rank_makes_the_other_fail_after_ddp_timeout(tmp_path):
    procs = launch.start(["-m", "tests.strategy.worker", "stall", str(tmp_path)])
    start = time.monotonic()
    survivor = launch.wait(procs[:1], timeout=90)[0]
    elapsed = time.monotonic() - start
    launch.wait(procs[1:], timeout=1)  # the stuck rank is killed, not waited for
    assert survivor.returncode not in (0, None), survivor.output[-3000:]
    assert "within ddp_timeout=5s" in survivor.output, survivor.output[-3000:]
    assert elapsed < 60  # start-up plus 5 s of waiting, not the 60 s the other rank sleeps
