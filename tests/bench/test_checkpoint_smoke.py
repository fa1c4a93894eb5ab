"""`python -m bench.checkpoint --smoke` runs end to end and writes a complete, finite report.

Speed is never asserted here (the machine is shared); only structure, finiteness and the
correctness checks the benchmark makes along the way (async checkpoints verify and match sync).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _numbers(node: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in _numbers(v, f"{path}[{i}]")]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [(path, float(node))]
    return []


def test_checkpoint_bench_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "bench.checkpoint",
        "--smoke",
        "--out",
        str(tmp_path),
        "--work",
        str(tmp_path / "w"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((tmp_path / "checkpoint-smoke.json").read_text())
    cfg, resume, saves, profile = result["config"], result["resume"], result["saves"], result["profile"]
    assert result["smoke"] is True and result["machine"]["torch_threads"] == 1

    # Resumed runs continue right after the checkpoint's step, near and far.
    assert resume["first_step_after_resume"]["near"] == cfg["near_step"] + 1
    assert resume["first_step_after_resume"]["far"] == cfg["far_step"] + 1
    for key in ("near", "far", "fresh"):
        for metric in ("wall", "cpu", "restore"):
            assert resume[key][metric]["n"] == cfg["reps"], (key, metric)
        assert resume[key]["wall"]["median"] > 0 and resume[key]["cpu"]["median"] > 0, key
    assert resume["fresh"]["restore"]["median"] == 0  # no checkpoint, nothing restored
    assert resume["near"]["restore"]["median"] > 0 and resume["far"]["restore"]["median"] > 0
    for key in ("replay_full", "replay_indices"):
        assert resume[key]["n"] == cfg["replay_reps"] and resume[key]["median"] > 0, key
    assert set(resume["ratio_far_near"]) == {"wall", "cpu", "restore"}

    measured = (cfg["saves"] - 1) * cfg["save_reps"]  # each run's final save has no next step to end it
    for mode in ("sync", "async"):
        assert saves[mode]["saves"] == cfg["saves"], mode
        assert len(saves[mode]["blocking"]["values"]) == measured, mode
        assert len(saves[mode]["blocking_cpu"]["values"]) == measured, mode
    assert saves["none"]["saves"] == 0 and saves["none"]["blocking"] is None
    for mode in ("none", "sync", "async"):
        assert saves[mode]["wall"]["n"] == cfg["save_reps"] and saves[mode]["median_step"] > 0, mode
    assert saves["async_ok"] is True, saves["checks"]
    assert saves["checks"][0]["tensor_files_compared"] > 0 and not saves["checks"][0]["problems"]

    assert {"take_snapshot_copy", "write_manifest_fsync_and_hash"} <= set(profile["save"])
    assert {"verify_deep_hash", "resume_to_first_step"} <= set(profile["load"])
    disk = result["disk"]
    assert disk["bytes"] > 0 and disk["files"] >= 8
    for key in ("save_fraction_of_disk", "load_fraction_of_disk", "disk_write_MBps", "sync_save_MBps"):
        assert disk[key] > 0, key
    assert disk["hash_seconds_per_GB"]["xxh3_128"] < disk["hash_seconds_per_GB"]["sha256"]

    bad = [(path, value) for path, value in _numbers(result) if not math.isfinite(value)]
    assert not bad, bad

    text = (tmp_path / "checkpoint-smoke.md").read_text()
    for heading in (
        "## 1. Resume time",
        "## 2. What a save blocks",
        "## 3. Where the time goes",
        "## 4. Against the disk",
    ):
        assert heading in text
    assert "nan" not in text.lower() and "inf " not in text.lower()
