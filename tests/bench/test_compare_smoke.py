"""`python -m bench.compare --smoke` end to end: structure and finiteness, never speed."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = (
    "main_s",
    "steps_per_s",
    "tokens_per_s",
    "step_ms_median",
    "process_wall_s",
    "peak_rss_mib",
    "time_to_first_step_s",
    "import_torch_s",
    "import_lib_s",
    "train_loss",
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the benchmark's GPT-2 comes from transformers"
)


def _hf_trainer_runs() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "accelerate"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke", "--workloads", "a", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    path = out / "smoke.json"
    assert path.exists(), (
        f"no results written; exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    assert (out / "smoke.md").read_text().startswith("# ember vs raw PyTorch")
    return proc, json.loads(path.read_text())


def test_every_implementation_ran_with_finite_figures(
    smoke: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    proc, payload = smoke
    expected = {"raw", "ember"} | ({"hf"} if _hf_trainer_runs() else set())
    runs = payload["runs"]
    assert {r["impl"] for r in runs} == expected, proc.stderr[-2000:]
    for run in runs:
        assert run["ok"], run.get("error")
        assert run["workload"] == "a" and run["steps"] == payload["workloads"]["a"]["steps"]
        for key in FIGURES:
            value = run[key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (run["impl"], key, value)
        assert run["main_s"] > 0 and run["peak_rss_mib"] > 0 and run["time_to_first_step_s"] > 0
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_summary_has_paired_ratios_and_machine(smoke: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, payload = smoke
    ratios = payload["summary"]["a"]["ratios"]
    assert set(ratios) == {"ember/raw"} | ({"ember/hf"} if _hf_trainer_runs() else set())
    for stats in ratios.values():
        assert math.isfinite(stats["main_s"]["median"]) and stats["main_s"]["n"] == 1
    machine = payload["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["OMP_WAIT_POLICY"] == "PASSIVE"
    assert payload["config"]["threads"] == 1


def test_ember_and_raw_train_the_same_job(smoke: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    # Same init, batches, optimizer and schedule: the mean training loss must agree.
    _, payload = smoke
    loss = {r["impl"]: r["train_loss"] for r in payload["runs"]}
    assert loss["ember"] == pytest.approx(loss["raw"], rel=1e-4)
