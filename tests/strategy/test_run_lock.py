"""Under torchrun only rank 0 takes the output_dir lock, and a refusal stops every rank."""

from __future__ import annotations

import os
from pathlib import Path

from ember.checkpoint.lock import RunLock
from tests.strategy.conftest import run_suite


def test_every_rank_is_refused_when_another_run_holds_the_folder(tmp_path: Path) -> None:
    with RunLock(tmp_path / "locked"):
        run_suite(tmp_path, "locked")
    for rank in (0, 1):
        message = (tmp_path / f"locked-rank{rank}.txt").read_text()
        assert f"pid {os.getpid()}" in message and "in use by another training run" in message
    assert (tmp_path / "free" / "checkpoint-2" / "manifest.json").exists()
