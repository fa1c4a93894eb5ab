"""GPU check of tensor and context parallelism (issue 20): the tp 2 and cp 2 runs equal the one-GPU
run (NCCL, bf16), and tokens/s and MFU of each on one node.

    python -m bench.gpu_tp                  # needs 2 GPUs for tp 2 / cp 2; about 4 minutes on 2 x H100
    python -m bench.gpu_tp --cpu-smoke      # tiny sizes on CPU (gloo, fp32): checks the script runs

Every run trains the same Llama-shaped model (8 layers x 2048, 16 heads / 8 kv heads, vocab 32,000,
seq 2048, global batch 8, bf16 autocast, AdamW) for 20 steps from the same seed and data through
ember's Trainer (`parallelism_config={"tp_size": 2}` or `{"cp_size": 2}`), each launched with
torchrun. It prints the largest difference of the logged losses against one GPU (bf16: reductions
run in another order, so it is a tolerance, 2e-2, not equality) and, per layout, the median
tokens/s and MFU that ember logs (its peak-FLOPs table names the GPU; pass --peak-flops otherwise)
and rank 0's peak memory (cp 2 holds half of each sequence's activations). With one GPU only the
one-GPU row is measured and the others say why they are missing. Exit status 1 when the losses
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
# layout name -> (processes, parallelism_config)
LAYOUTS: dict[str, tuple[int, dict[str, int] | None]] = {
    "one": (1, None),
    "tp 2": (2, {"tp_size": 2}),
    "cp 2": (2, {"cp_size": 2}),
}


def child(spec: dict[str, Any], layout: str, out: str, cpu: bool, peak: float | None) -> None:
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
            per_device_train_batch_size=spec["batch"],  # tp/cp ranks share one batch: global = batch
            learning_rate=3e-4,
            warmup_steps=2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            device_peak_flops=peak,
            parallelism_config=LAYOUTS[layout][1],
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[clock])
        trainer.train()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    logs = [entry for entry in clock.logs if "loss" in entry]
    steady = logs[3:]  # after allocation, autotuning and warm-up
    result = {
        "layout": layout,
        "losses": [entry["loss"] for entry in logs],
        "tokens_per_second": statistics.median(e["tokens_per_second"] for e in steady) if steady else None,
        "mfu": statistics.median(e["mfu"] for e in steady) if steady and "mfu" in steady[0] else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    Path(out).write_text(json.dumps(result))


def launch(spec: dict[str, Any], layout: str, cpu: bool, peak: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        nproc = LAYOUTS[layout][0]
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "bench.gpu_tp", "--child", layout, "--spec", json.dumps(spec), "--out", str(out),
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
            raise SystemExit(f"{layout}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
        return dict(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s of one GPU")
    parser.add_argument("--child", choices=list(LAYOUTS), default=None)
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
    rows = {"one": launch(spec, "one", opts.cpu_smoke, opts.peak_flops)}
    missing: dict[str, str] = {}
    diffs: dict[str, float] = {}
    for layout in ("tp 2", "cp 2"):
        if opts.cpu_smoke or gpus >= 2:
            rows[layout] = launch(spec, layout, opts.cpu_smoke, opts.peak_flops)
            pairs = zip(rows["one"]["losses"], rows[layout]["losses"], strict=True)
            diffs[layout] = max(abs(a - b) for a, b in pairs)
        else:
            missing[layout] = f"needs 2 GPUs (NCCL, one device per rank); this machine has {gpus}"
    lines = [
        "# Tensor and context parallelism on GPU vs one GPU (NCCL, bf16)"
        if not opts.cpu_smoke
        else "# CPU smoke",
        "",
        f"Llama-shaped {spec['layers']} x {spec['width']}, vocab {spec['vocab']}, seq {spec['seq']}, batch "
        f"{spec['batch']}, {spec['steps']} steps; {torch.cuda.get_device_name(0) if gpus else 'CPU'}. "
        "Generated by `python -m bench.gpu_tp`.",
        "",
        "| layout | tokens/s (all GPUs) | MFU | peak GiB (rank 0) | loss diff vs one GPU |",
        "|---|---:|---:|---:|---:|",
    ]
    for layout, row in rows.items():
        lines.append(
            f"| {layout} | {row['tokens_per_second']} | {row['mfu']} | {row['peak_memory_gib']} | "
            f"{diffs.get(layout, '')} |"
        )
    for layout, why in missing.items():
        lines.append(f"| {layout} | {why} | | | |")
    lines += ["", f"Tolerance on the logged-loss difference: {LOSS_TOL}."]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not opts.cpu_smoke:
        results = REPO / "bench" / "results"
        (results / "gpu_tp.md").write_text(markdown)
        (results / "gpu_tp.json").write_text(json.dumps({"spec": spec, "rows": rows, "loss_diff": diffs}))
    return 1 if any(d > LOSS_TOL for d in diffs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
