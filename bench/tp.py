"""Tensor-parallel bench: step time, per-rank memory and where the time goes, for one process, tp 2
and dp 2 x tp 2 (`parallelism_config`), each launched with torchrun on CPU (gloo).

    python -m bench.tp                     # the three layouts, ~3 minutes on 2 cores
    python -m bench.tp --layouts one,tp2 --steps 12

Every layout trains the same small Llama (hidden 256, 4 layers, 8 heads / 4 kv heads, vocab 4096,
seq 128) with the same global batch of 8 through ember's Trainer. Per rank it reports:
- the median step time after the first steps (wall, and this process's CPU time);
- peak RSS, and the bytes of the local shards of parameters, gradients and AdamW state;
- time in collectives: for 3 steps under torch.profiler, the self CPU time of the c10d / gloo /
  functional-collective events (the training thread blocked in or launching a collective), as a
  share of those steps' wall time. The rest is compute (and Python).
Results: bench/results/tp.{md,json}. One intra-op thread per process: 4 processes on a 2-core
machine share cores, so dp 2 x tp 2's wall times also count waiting for a core (CPU time does not).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LAYOUTS: dict[str, tuple[int, dict[str, int] | None]] = {
    "one": (1, None),
    "tp2": (2, {"tp_size": 2}),
    "dp2xtp2": (4, {"dp_shard_size": 2, "tp_size": 2}),
}
GLOBAL_BATCH, SEQ, VOCAB = 8, 128, 4096
COLLECTIVE = re.compile(r"c10d|gloo|wait_tensor|record_param_comms|nccl", re.IGNORECASE)


def _model() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def child(layout: str, steps: int, out: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.perf_common import peak_rss_mib, step_clock_callback
    from ember import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(1)
    nproc, sizes = LAYOUTS[layout]
    dp = 1 if sizes is None else sizes.get("dp_replicate_size", 1) * sizes.get("dp_shard_size", 1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (steps * GLOBAL_BATCH, SEQ), generator=g)
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    clock = step_clock_callback(TrainerCallback)
    profile_from = steps - 3

    class Profile(TrainerCallback):  # the last 3 steps, after the timed ones
        prof: Any = None
        start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == profile_from:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == steps and self.prof is not None:
                self.wall = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)

    profiler = Profile()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            use_cpu=True,
            max_steps=steps,
            per_device_train_batch_size=GLOBAL_BATCH // dp,
            learning_rate=1e-3,
            logging_steps=steps,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            parallelism_config=dict(sizes) if sizes else None,
        )
        trainer = Trainer(model=_model(), args=args, train_dataset=data, callbacks=[clock, profiler])
        start, cpu0 = time.perf_counter(), time.process_time()
        trainer.train()
    stamps, cpus = [start, *clock.times[:profile_from]], [cpu0, *clock.cpu[:profile_from]]
    wall = [b - a for a, b in zip(stamps, stamps[1:])][2:]  # after allocation / first-touch steps
    cpu = [b - a for a, b in zip(cpus, cpus[1:])][2:]
    events = profiler.prof.key_averages()
    comm_us = sum(e.self_cpu_time_total for e in events if COLLECTIVE.search(e.key))
    model, opt = trainer.model_wrapped, trainer.optimizer

    def local_bytes(tensors: Any) -> int:
        from torch.distributed.tensor import DTensor

        total = 0
        for t in tensors:
            t = t.to_local() if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
        return total

    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    result = {
        "layout": layout,
        "rank": int(os.environ.get("RANK", "0")),
        "processes": nproc,
        "step_ms": 1e3 * statistics.median(wall),
        "step_cpu_ms": 1e3 * statistics.median(cpu),
        "collective_share": comm_us / 1e6 / profiler.wall,
        "profiled_step_ms": 1e3 * profiler.wall / 3,
        "peak_rss_mib": peak_rss_mib(),
        "state_mib": (local_bytes(params) + local_bytes(state)) / 2**20,
        "param_mib": local_bytes(params) / 2**20,
    }
    Path(out, f"rank-{result['rank']}.json").write_text(json.dumps(result))


def launch(layout: str, steps: int, timeout: float) -> list[dict[str, Any]]:
    nproc = LAYOUTS[layout][0]
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "bench.tp", "--child", layout, "--steps", str(steps), "--out", tmp,
        ]  # fmt: skip
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "TOKENIZERS_PARALLELISM": "false",
        }
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"{layout}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))]


def markdown(rows: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> str:
    lines = [
        "# Tensor parallelism on CPU (gloo): step time, memory, collectives",
        "",
        f"Small Llama (hidden 256, 4 layers, vocab {VOCAB}, seq {SEQ}), global batch {GLOBAL_BATCH}, AdamW, "
        f"fp32, ember Trainer with `parallelism_config`; torch {info['torch']}, {info['cpu_count']} cores "
        f"(load average {info['load_avg'][0]:.1f} at start), one thread per process. Generated by "
        "`python -m bench.tp`. Per-rank figures are the median over ranks.",
        "",
        "| layout | processes | step wall ms | step CPU ms | in collectives | peak RSS MiB | "
        "params+AdamW MiB per rank |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layout, ranks in rows.items():

        def m(key: str, ranks: list[dict[str, Any]] = ranks) -> float:
            return float(statistics.median(r[key] for r in ranks))

        lines.append(
            f"| {layout} | {ranks[0]['processes']} | {m('step_ms'):.0f} | {m('step_cpu_ms'):.0f} | "
            f"{100 * m('collective_share'):.0f}% | {m('peak_rss_mib'):.0f} | {m('state_mib'):.1f} |"
        )
    lines += [
        "",
        "- *in collectives*: share of the wall time of 3 profiled steps that the training thread spent "
        "in c10d/gloo/functional-collective events (self CPU time, torch.profiler); the rest is compute "
        "and Python.",
        "- Peak RSS includes Python, torch and transformers (several hundred MiB per process); the last "
        "column is what the layout divides: local shards of parameters and AdamW moments.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tag", default="tp")
    opts = parser.parse_args(argv)
    if opts.child:
        child(opts.child, opts.steps, opts.out)
        return 0
    from bench.perf_common import machine, write_results

    info = machine()
    rows = {layout: launch(layout, opts.steps, 1200) for layout in opts.layouts.split(",")}
    write_results(opts.tag, {"machine": info, "rows": rows}, markdown(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
