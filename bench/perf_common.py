"""What bench/chunked_loss.py and bench/packing.py share: fresh child processes, step clocks, tables.

Each measurement runs in its own interpreter (`python -m bench.<script> --child ...`) so peak RSS
(`ru_maxrss`) belongs to that one run; implementations are interleaved round by round and the
tables show medians. Children run with one thread and OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare import child_env  # one environment for every benchmark child

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def run_child(module: str, spec: dict[str, Any], threads: int = 1, timeout: float = 1800) -> dict[str, Any]:
    """Run `python -m module --child SPEC_JSON --out FILE` and return the JSON it wrote."""
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--child", json.dumps(spec), "--out", str(out)]
        proc = subprocess.run(
            cmd, env=child_env(threads), cwd=str(REPO), capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0 or not out.exists():
            return {"ok": False, "error": (proc.stderr or proc.stdout)[-3000:], **spec}
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def step_clock_callback(base: type) -> Any:
    """A TrainerCallback (of ember or transformers) that stamps the end of every optimizer step.

    It also keeps every log dict it is handed: ember's throughput figures reach `on_log` but not
    `state.log_history`. Wall time and this process's CPU time: with one thread on a shared machine,
    CPU time per step is what the code costs, while wall time also counts the time other processes
    held the core.
    """

    class Clock(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.logs: list[dict[str, Any]] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            self.logs.append(dict(logs or {}))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return Clock()


def median_step_ms(times: list[float], start: float) -> float | None:
    """Median of the step durations after the first (allocation, first-touch) step."""
    stamps = [start, *times]
    steps = [b - a for a, b in zip(stamps, stamps[1:])][1:]
    return 1e3 * statistics.median(steps) if steps else None


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        info["ember_commit"] = commit
    except OSError:
        pass
    return info


def med(values: list[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def write_results(tag: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(payload, indent=1, default=str))
    (RESULTS / f"{tag}.md").write_text(markdown)
    print(markdown)
