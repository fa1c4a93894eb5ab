"""Fine-tuning features on CPU: activation checkpointing memory, torch.compile speed.

    python -m bench.finetune ac          # peak memory with vs without activation checkpointing
    python -m bench.finetune compile     # steps/s compiled vs eager, and the cold-compile time

Each measurement runs in a fresh interpreter (`python -m bench.finetune child ...`) so peak RSS and
compile caches are its own. Results: bench/results/finetune-<what>.{json,md}.

- ac: a GPT-2 (6 layers, 256 wide, 8 x 256 tokens) trains 3 steps through ember's Trainer. Reported:
  the bytes autograd saves for backward in one training forward (exact, from saved-tensor hooks),
  the process's peak RSS growth during train() (ru_maxrss), and seconds per step.
- compile: a smaller GPT-2 (4 layers, 128 wide, 8 x 128 tokens), `torch_compile=True` vs eager,
  20 steps; the first step's time (cold compile) and steps/s over the last 10.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _gpt2(layers: int, width: int, vocab: int = 1000, positions: int = 256) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _data(n: int, seq: int, vocab: int = 1000) -> list[dict[str, list[int]]]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq), generator=g).tolist()
    return [{"input_ids": row, "labels": list(row)} for row in ids]


def _collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    import torch

    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


class _StepTimes:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def callback(self) -> Any:
        from ember import TrainerCallback

        outer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
                outer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
                outer.times.append(time.perf_counter() - outer.start)

        return Timer()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_ac(on: bool) -> dict[str, Any]:
    import torch

    from ember import Trainer, TrainingArguments
    from ember.models.pipeline import prepare_model

    torch.set_num_threads(2)
    seq, batch = 256, 8
    args = TrainingArguments(
        output_dir="/tmp/ember-bench-ac", max_steps=3, per_device_train_batch_size=batch,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=1,
        activation_checkpointing=on, optim="adamw_torch",
    )  # fmt: skip
    model = _gpt2(6, 256)
    probe = _collate(_data(batch, seq))
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    prepare_model(model, args)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**probe)
    timer = _StepTimes()
    trainer = Trainer(model, args, train_dataset=_data(64, seq), data_collator=_collate)
    trainer.add_callback(timer.callback())
    before = _rss_mb()
    trainer.train()
    return {
        "activation_checkpointing": on,
        "saved_activation_mb": saved / 2**20,
        "peak_rss_growth_mb": _rss_mb() - before,
        "peak_rss_mb": _rss_mb(),
        "s_per_step": sum(timer.times[1:]) / max(len(timer.times) - 1, 1),
    }


def child_compile(on: bool) -> dict[str, Any]:
    import torch

    from ember import Trainer, TrainingArguments

    torch.set_num_threads(2)
    args = TrainingArguments(
        output_dir="/tmp/ember-bench-compile", max_steps=20, per_device_train_batch_size=8,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=5,
        torch_compile=on, optim="adamw_torch",
    )  # fmt: skip
    timer = _StepTimes()
    trainer = Trainer(
        _gpt2(4, 128, positions=128), args, train_dataset=_data(160, 128), data_collator=_collate
    )
    trainer.add_callback(timer.callback())
    trainer.train()
    steady = timer.times[-10:]
    return {
        "torch_compile": on,
        "first_step_s": timer.times[0],
        "steps_per_s": len(steady) / sum(steady),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def _run_child(what: str, on: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.finetune", "child", what, "on" if on else "off"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _render(what: str, runs: list[dict[str, Any]]) -> str:
    keys = [k for k in runs[0] if k != "losses"]
    lines = [
        f"# bench.finetune {what}",
        "",
        f"machine: {platform.processor() or platform.machine()}, torch 2 threads",
        "",
    ]
    lines.append("| " + " | ".join(keys) + " |")
    lines.append("|" + "---|" * len(keys))
    for r in runs:
        lines.append(
            "| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.finetune")
    p.add_argument("what", choices=("ac", "compile", "child"))
    p.add_argument("rest", nargs="*")
    ns = p.parse_args(argv)
    if ns.what == "child":
        kind, flag = ns.rest
        fn = child_ac if kind == "ac" else child_compile
        print(json.dumps(fn(flag == "on")))
        return 0
    runs = [_run_child(ns.what, on) for on in (False, True)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"finetune-{ns.what}.json").write_text(json.dumps(runs, indent=2) + "\n")
    md = _render(ns.what, runs)
    (RESULTS / f"finetune-{ns.what}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
