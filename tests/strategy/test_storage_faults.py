"""Storage faults on one rank of a sharded (FSDP) save, on 2 real processes.

Policy: a checkpoint that cannot be written on any rank stops training on every rank with
`CheckpointWriteError` (the rank, the OS error, the newest intact checkpoint); nothing of the
failed checkpoint is left, and a resume continues from the previous one exactly. A shard changed
after writing is found by the manifest's hash at resume, naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.strategy.conftest import max_diff, run_suite


def _rank(out: Path, name: str, rank: int) -> dict:
    return json.loads((out / f"{name}-rank{rank}.json").read_text())


def _state(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{name}.safetensors"))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_shard_write_on_one_rank_stops_every_rank_and_the_run_resumes(tmp_path, mode):
    name = "fault-async" if mode == "async" else "fault"
    run_suite(tmp_path, "sharded-fault", *(["--async"] if mode == "async" else []), timeout=240)
    for rank in (0, 1):
        report = _rank(tmp_path, name, rank)
        message = report["message"]
        # Every rank stopped at the failed save (async: at the next wait for it), with the reason.
        assert report["step"] in ((4,) if mode == "sync" else (4, 5, 6)), report
        assert "checkpoint-4" in message and "failed on rank(s) [1]" in message, message
        assert "File too large" in message, message  # EFBIG from the kernel, on rank 1's shard
        assert "intact (newest complete one: checkpoint-2)" in message, message
        # Nothing of checkpoint-4 was left behind when the failure was seen.
        assert report["folders"] == ["checkpoint-2"], report
    run = tmp_path / name
    assert not list(run.glob("*.tmp"))
    # Training state stayed consistent: resuming from checkpoint-2 ends where a run without the
    # fault ends, bit for bit.
    assert max_diff(_state(tmp_path, name), _state(tmp_path, f"{name}-ref")) == 0.0


def test_a_corrupted_shard_is_found_at_resume_naming_the_file(tmp_path):
    run_suite(tmp_path / "first", "sharded-fault", timeout=240)
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "first" / "fault", run)
    shutil.rmtree(run / "checkpoint-6")
    shards = sorted((run / "checkpoint-4" / "sharded").glob("shard-*.safetensors"))
    assert len(shards) == 2
    victim = shards[1]  # rank 1's file
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01  # same size: only a hash can tell
    victim.write_bytes(bytes(data))
    run_suite(tmp_path, "corrupt-shard", str(run), timeout=240)
    for rank in (0, 1):
        message = _rank(tmp_path, "corrupt", rank)["message"]
        assert f"sharded/{victim.name}" in message and "hash mismatch" in message, message
    # resume_from_checkpoint=True skips the damaged checkpoint-4 and resumes exactly from checkpoint-2.
    reference = _state(tmp_path / "first", "fault-ref")
    assert max_diff(_state(tmp_path, "corrupt-fallback"), reference) == 0.0
