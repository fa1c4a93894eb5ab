"""ember fixes glibc's malloc thresholds for CPU training, so freed step memory is not refaulted."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ember.telemetry.cpu_malloc import user_chose_allocator

ROOT = Path(__file__).resolve().parents[2]

# A fresh process trains a small GPT-2 and reports the minor page faults of each optimizer step: a
# fault is a page the kernel hands (zeroed) to the process, which with glibc's moving thresholds
# happens to thousands of pages per step that the previous step had just given back.
SCRIPT = """
import json, resource, sys, tempfile, torch
torch.set_num_threads(1)
from transformers import GPT2Config, GPT2LMHeadModel
from ember import Trainer, TrainerCallback, TrainingArguments
from ember.telemetry import cpu_malloc
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=2, n_positions=128, vocab_size=256))
rows = torch.randint(0, 256, (160, 128), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": x, "labels": x} for x in rows]
faults = []
class Faults(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(
        output_dir=out, max_steps=int(sys.argv[2]), per_device_train_batch_size=8, report_to="none",
        save_strategy="no", disable_tqdm=True, tune_cpu_malloc=sys.argv[1] == "on",
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Faults()]).train()
print(json.dumps({"applied": cpu_malloc.applied(), "faults": [b - a for a, b in zip(faults, faults[1:])]}))
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


def _train(mode: str, steps: int, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(steps)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_only
def test_cpu_training_keeps_freed_memory_mapped_between_steps() -> None:
    run = _train("on", 16)
    assert run["applied"] is True
    steady = run["faults"][4:]
    # Untuned, this job faults ~5,000 pages (20 MB) per step on glibc 2.36; tuned, almost none.
    assert statistics.median(steady) <= 64, steady


@glibc_only
def test_off_and_a_users_own_malloc_settings_leave_malloc_alone() -> None:
    assert _train("off", 2)["applied"] is False
    assert _train("on", 2, MALLOC_ARENA_MAX="2")["applied"] is False


def test_user_allocator_choices_are_recognised() -> None:
    assert user_chose_allocator({}) is None
    assert user_chose_allocator({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_"
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "GLIBC_TUNABLES"
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None
    assert user_chose_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "LD_PRELOAD"
    assert user_chose_allocator({"LD_PRELOAD": "/opt/libfoo.so"}) is None
