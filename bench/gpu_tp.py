"""GPU check of tensor parallelism (issue 20): the tp 2 run equals the one-GPU run (NCCL, bf16), and
tokens/s and MFU of tp 1 and tp 2 on one node.

    python -m bench.gpu_tp                  # needs 2 GPUs for tp 2; about 3 minutes on 2 x H100
    python -m bench.gpu_tp --cpu-smoke      # tiny sizes on CPU (gloo, fp32): checks the script runs

Both runs train the same Llama-shaped model (8 layers x 2048, 16 heads / 8 kv heads, vocab 32,000,
seq 2048, global batch 8, bf16 autocast, AdamW) for 20 steps from the same seed and data through
ember's Trainer (`parallelism_config={"tp_size": 2}` for tp 2), each launched with torchrun. It
prints the largest difference of the logged losses (bf16: reductions run in another order under
TP, so it is a tolerance, 2e-2, not equality) and, per layout, the median tokens/s and MFU that
ember logs (its peak-FLOPs table names the GPU; pass --peak-flops otherwise). With one GPU only
the tp 1 row is measured and the tp 2 row says why it is missing. Exit status 1 when the losses
differ beyond the tolerance. Results: bench/results/gpu_tp.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FULL = {
    "layers": 8,
    "width": 2048,
    "heads": 16,
    "kv": 8,
    "vocab": 32000,
    "seq": 2048,
    "batch": 8,
    "steps": 20,
}
SMOKE = {"layers": 2, "width": 64, "heads": 4, "kv": 2, "vocab": 101, "seq": 32, "batch": 4, "steps": 6}
LOSS_TOL = 2e-2


def child(spec: dict[str, Any], tp: int, out: str, cpu: bool, peak: float | None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.perf_common import step_clock_callback
    from ember import Trainer, TrainerCallback, TrainingArguments

    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["width"],
        intermediate_size=spec["width"] * 11 // 4,
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        max_position_embeddings=spec["seq"],
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec["vocab"], (spec["steps"] * spec["batch"], spec["seq"]), generator=g)
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    clock = step_clock_callback(TrainerCallback)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            use_cpu=cpu,
            bf16=not cpu,
            max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch"],  # tp ranks share one batch: global = batch
            learning_rate=3e-4,
            warmup_steps=2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            device_peak_flops=peak,
            parallelism_config={"tp_size": tp} if tp > 1 else None,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[clock])
        trainer.train()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    logs = [entry for entry in clock.logs if "loss" in entry]
    steady = logs[3:]  # after allocation, autotuning and warm-up
    result = {
        "tp": tp,
        "losses": [entry["loss"] for entry in logs],
        "tokens_per_second": statistics.median(e["tokens_per_second"] for e in steady) if steady else None,
        "mfu": statistics.median(e["mfu"] for e in steady) if steady and "mfu" in steady[0] else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    Path(out).write_text(json.dumps(result))


def launch(spec: dict[str, Any], tp: int, cpu: bool, peak: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp),
            "-m", "bench.gpu_tp", "--child", str(tp), "--spec", json.dumps(spec), "--out", str(out),
        ]  # fmt: skip
        if cpu:
            command.append("--cpu-smoke")
        if peak:
            command += ["--peak-flops", str(peak)]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"tp {tp}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
        return dict(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s of one GPU")
    parser.add_argument("--child", type=int, default=None)
    parser.add_argument("--spec", default=None)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    if opts.child is not None:
        child(json.loads(opts.spec), opts.child, opts.out, opts.cpu_smoke, opts.peak_flops)
        return 0
    import torch

    gpus = torch.cuda.device_count()
    if not opts.cpu_smoke and gpus == 0:
        print("bench/gpu_tp.py: no CUDA device here; `python -m bench.gpu_tp --cpu-smoke` checks the script")
        return 0
    spec = SMOKE if opts.cpu_smoke else FULL
    rows = {1: launch(spec, 1, opts.cpu_smoke, opts.peak_flops)}
    missing = None
    if opts.cpu_smoke or gpus >= 2:
        rows[2] = launch(spec, 2, opts.cpu_smoke, opts.peak_flops)
    else:
        missing = f"tp 2 needs 2 GPUs (NCCL, one device per rank); this machine has {gpus}"
    diff = None
    if 2 in rows:
        diff = max(abs(a - b) for a, b in zip(rows[1]["losses"], rows[2]["losses"], strict=True))
    lines = [
        "# Tensor parallelism on GPU: tp 1 vs tp 2 (NCCL, bf16)" if not opts.cpu_smoke else "# CPU smoke",
        "",
        f"Llama-shaped {spec['layers']} x {spec['width']}, vocab {spec['vocab']}, seq {spec['seq']}, batch "
        f"{spec['batch']}, {spec['steps']} steps; {torch.cuda.get_device_name(0) if gpus else 'CPU'}. "
        "Generated by `python -m bench.gpu_tp`.",
        "",
        "| tp | tokens/s (all GPUs) | MFU | peak GiB (rank 0) |",
        "|---:|---:|---:|---:|",
    ]
    for tp, row in rows.items():
        lines.append(f"| {tp} | {row['tokens_per_second']} | {row['mfu']} | {row['peak_memory_gib']} |")
    if missing:
        lines.append(f"| 2 | {missing} | | |")
    lines += ["", f"Largest logged-loss difference tp 2 vs tp 1: {diff} (tolerance {LOSS_TOL})."]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not opts.cpu_smoke:
        results = REPO / "bench" / "results"
        (results / "gpu_tp.md").write_text(markdown)
        (results / "gpu_tp.json").write_text(json.dumps({"spec": spec, "rows": rows, "loss_diff": diff}))
    return 1 if diff is not None and diff > LOSS_TOL else 0


if __name__ == "__main__":
    sys.exit(main())
