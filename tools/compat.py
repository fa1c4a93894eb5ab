"""Upstream drift as a report: ember against the newest transformers, peft, accelerate and datasets.

usage: python -m tools.compat [--locked-python PY] [--env DIR] [--fresh] [--skip-tests]
(`make compat` runs it with the locked environment's python.)

1. Builds a scratch environment (`.venv-compat/`, reused unless --fresh): torch and every other
   package at its locked version (constraints.txt), transformers, peft, accelerate and datasets at
   their newest releases (with the Hugging Face packages they pull, unpinned).
2. Records the public surface that ember follows (`tools.surface`) with the locked and with the
   newest versions, and prints what changed: TrainingArguments fields added, removed or with a new
   default; Trainer / Seq2SeqTrainer members added, removed or with new parameters; TrainerState,
   TrainerControl and callback events. Each added item says whether ember already has it.
3. Runs the drop-in tests (`-m "dropin and not surface"`: the surface comparison is step 2's job)
   in the scratch environment and lists those that fail.

Exit status: 0 when the drop-in tests pass on the newest releases (surface changes alone are
reported, not failures: they are work to schedule, not breakage), 1 when a drop-in test fails,
2 when the scratch environment cannot be built.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
UPSTREAM = ("transformers", "peft", "accelerate", "datasets")
# Released in step with the four above: their locked pins would hold the newest releases back.
FOLLOWERS = ("huggingface-hub", "hf-xet", "tokenizers", "safetensors", "fsspec", "pyarrow", "multiprocess")
EXTRAS = "hf,dev,peft"


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, **kw)


def _pip(py: str, *args: str) -> None:
    done = _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args])
    if done.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def _package(line: str) -> str:
    return line.split("==")[0].split(" @ ")[0].strip().lower().replace("_", "-")


def build_env(env: Path, fresh: bool) -> str:
    py = str(env / "bin" / "python")
    if fresh or not Path(py).exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    free = {p.lower() for p in UPSTREAM + FOLLOWERS}
    kept = [ln for ln in LOCK.read_text().splitlines() if ln.strip() and _package(ln) not in free]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(kept) + "\n")
    torch_pin = next(ln for ln in kept if _package(ln) == "torch")
    _pip(py, "-c", f.name, torch_pin.split("+")[0])
    _pip(py, "-c", f.name, "-e", f".[{EXTRAS}]")
    _pip(py, "-c", f.name, "--upgrade", *UPSTREAM)
    return py


def read_surface(py: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    done = _run([py, "-m", "tools.surface", "--out", out])
    if done.returncode != 0:
        raise RuntimeError(f"tools.surface failed under {py}:\n{done.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def diff_section(title: str, old: Any, new: Any, ours: Any) -> list[str]:
    """Lines describing how one part of the surface moved; empty when it did not."""
    lines: list[str] = []
    if isinstance(old, list):
        old, new, ours = dict.fromkeys(old, ""), dict.fromkeys(new, ""), dict.fromkeys(ours, "")
    for name in sorted(set(new) - set(old)):
        has = "ember has it" if name in ours else "ember LACKS it"
        lines.append(f"  + {name} {new[name]!s}  ({has})".replace("  ()", ""))
    for name in sorted(set(old) - set(new)):
        lines.append(f"  - {name}  (removed upstream; ember keeps accepting it: {name in ours})")
    for name in sorted(set(old) & set(new)):
        if old[name] != new[name]:
            lines.append(f"  ~ {name}: {old[name]} -> {new[name]}")
    return [f"{title}:", *lines] if lines else []


def surface_report(locked: dict[str, Any], newest: dict[str, Any]) -> list[str]:
    lines = ["versions (locked -> newest):"]
    for pkg, version in newest["versions"].items():
        was = locked["versions"].get(pkg)
        lines.append(f"  {pkg}: {was} -> {version}" + ("" if was == version else "  (changed)"))
    old, new, ours = locked["transformers"], newest["transformers"], newest["ember"]
    titles = {
        "training_args": "TrainingArguments fields",
        "seq2seq_args": "Seq2SeqTrainingArguments fields",
        "trainer": "Trainer members",
        "seq2seq_trainer": "Seq2SeqTrainer members",
        "state": "TrainerState fields",
        "control": "TrainerControl fields",
        "callback_events": "TrainerCallback events",
    }
    changes: list[str] = []
    for key, title in titles.items():
        changes += diff_section(title, old[key], new[key], ours[key])
    return lines + (changes or ["surface: no change between the locked and the newest releases"])


def run_dropin_tests(py: str) -> tuple[int, list[str], str]:
    with tempfile.NamedTemporaryFile(suffix=".xml", delete=False) as f:
        junit = f.name
    cmd = [
        py,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-m",
        "dropin and not surface",
        "--junitxml",
        junit,
    ]
    done = _run(cmd)
    failed: list[str] = []
    passed = 0
    if Path(junit).stat().st_size:
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            elif case.find("skipped") is None:
                passed += 1
    totals = [ln for ln in done.stdout.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
    summary = totals[-1].strip("= ") if totals else done.stderr[-500:]
    return passed, failed, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--locked-python", default=sys.executable, help="python of the locked environment")
    parser.add_argument("--env", default=str(REPO / ".venv-compat"), help="the scratch environment")
    parser.add_argument("--fresh", action="store_true", help="rebuild the scratch environment")
    parser.add_argument("--skip-tests", action="store_true", help="report the surface only")
    opts = parser.parse_args()
    try:
        newest_py = build_env(Path(opts.env), opts.fresh)
        locked, newest = read_surface(opts.locked_python), read_surface(newest_py)
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(f"compat: could not build the scratch environment: {err}", file=sys.stderr)
        return 2
    print("\n".join(surface_report(locked, newest)))
    if opts.skip_tests:
        return 0
    passed, failed, summary = run_dropin_tests(newest_py)
    print(f"drop-in tests on the newest releases: {passed} passed, {len(failed)} failed ({summary})")
    for name in failed:
        print(f"  FAILED {name}")
    print("verdict: " + ("INCOMPATIBLE: fix the failures above" if failed else "compatible"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
