"""GPU check of the chunked loss and of packing (H100/H200), bf16, a fresh process per run.

    python -m bench.gpu_perf                 # about 5 minutes on one H200
    python -m bench.gpu_perf --cpu-smoke     # tiny sizes on CPU: checks the script runs

1. Chunked loss at vocab 128,256 (Llama 3's): a Llama-shaped model (4 layers x 2048, untied head),
   seq 4096, batch 2, bf16 autocast: peak CUDA memory (`max_memory_allocated`) and median step time
   of ember plain, ember `chunked_loss=True` and the transformers Trainer.
2. Packing with sdpa: GPT-2 124M shape, variable lengths (64..1024 tokens, seeded), batch 16:
   ember padded vs ember `PackingCollator(max_length=4096)`: real (target) tokens/s and MFU (from
   ember's step logs, peak from `ember.telemetry.throughput.PEAK_FLOPS`).

On a machine without CUDA it prints why and exits 0. Results: bench/results/gpu_perf.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from typing import Any

from bench.perf_common import fmt, machine, med, median_step_ms, run_child, step_clock_callback, write_results


def _llama(spec: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["width"],
        intermediate_size=spec["width"] * 11 // 4,
        num_hidden_layers=spec["layers"],
        num_attention_heads=max(spec["width"] // 128, 1),
        num_key_value_heads=max(spec["width"] // 256, 1),
        max_position_embeddings=spec["seq"],
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def _gpt2(spec: dict[str, Any]) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50257,
        n_positions=spec["max_len"],
        n_embd=spec["width"],
        n_layer=spec["layers"],
        n_head=spec["width"] // 64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def _data(spec: dict[str, Any], vocab: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    out = []
    for _ in range(spec["steps"] * spec["batch"]):
        n = spec["seq"] if spec["part"] == "chunked" else rng.randint(spec["min_len"], spec["max_len"])
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, *ids[1:]]})
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    lib, _, variant = spec["impl"].partition(":")
    if lib == "hf":
        from transformers import Trainer, TrainerCallback, TrainingArguments
    else:
        from ember import Trainer, TrainerCallback, TrainingArguments
    from ember.data import PackingCollator

    torch.manual_seed(0)
    model = _llama(spec) if spec["part"] == "chunked" else _gpt2(spec)
    vocab = model.config.vocab_size
    data = _data(spec, vocab)
    collator: Any = PackingCollator(max_length=spec.get("row_length")) if variant == "packed" else _pad
    # explicit for ember: its default chunks micro-batches of more than loss_chunk_size labels
    extra = {"chunked_loss": variant == "chunked"} if lib != "hf" else {}
    clock = step_clock_callback(TrainerCallback)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch"],
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch_fused" if cuda else "adamw_torch",
            bf16=True,
            logging_steps=1,  # a log line reads the loss: every step ends synchronised
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=not cuda,
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=0,
            **extra,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[clock]
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
    logs = [h for h in clock.logs if "loss" in h]
    return {
        **spec,
        "ok": True,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "step_ms": median_step_ms(clock.times, start),
        "losses": [h["loss"] for h in logs],
        "real_tokens_per_s": med([h.get("real_tokens_per_second") for h in logs[1:]]),
        "mfu": med([h.get("mfu") for h in logs[1:]]),
    }


def _pad(features: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def render(payload: dict[str, Any]) -> str:
    m, runs = payload["machine"], [r for r in payload["runs"] if r.get("ok")]
    device = runs[0]["device"] if runs else "?"
    lines = [
        f"# ember on {device}: chunked loss and packing, bf16 ({m['date_utc']})",
        "",
        f"- torch {m['torch']}, transformers {m.get('transformers')}, ember at {m.get('ember_commit')}",
        "- command: `python -m bench.gpu_perf " + " ".join(payload["argv"]) + "`",
        "",
        "| part | impl | peak CUDA MiB | step ms (median) | real tokens/s | MFU | loss step 1 | loss last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['part']} | {r['impl']} | {fmt(r['peak_cuda_mib'], 0)} | {fmt(r['step_ms'])} | "
            f"{fmt(r['real_tokens_per_s'], 0)} | {fmt(r['mfu'], 3)} | {r['losses'][0]:.5f} | "
            f"{r['losses'][-1]:.5f} |"
        )
    for r in payload["runs"]:
        if not r.get("ok"):
            lines.append(
                f"\nFAILED {r.get('part')} {r.get('impl')}:\n```\n{str(r.get('error'))[-1500:]}\n```"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_perf")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks that it runs")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tag", default=None)
    args_list = sys.argv[1:] if argv is None else argv
    ns = p.parse_args(args_list)
    if ns.child:
        result = child(json.loads(ns.child))
        with open(ns.out, "w") as f:
            json.dump(result, f)
        return 0
    import torch

    if not torch.cuda.is_available() and not ns.cpu_smoke:
        print("bench.gpu_perf: no CUDA device here; nothing to run (--cpu-smoke checks the script on CPU).")
        return 0
    tiny = ns.cpu_smoke
    chunked = {
        "part": "chunked",
        "vocab": 1000 if tiny else 128256,
        "seq": 64 if tiny else 4096,
        "batch": 2,
        "layers": 1 if tiny else 4,
        "width": 128 if tiny else 2048,
        "steps": 3 if tiny else ns.steps,
    }
    packing = {
        "part": "packing",
        "min_len": 8 if tiny else 64,
        "max_len": 64 if tiny else 1024,
        "row_length": 128 if tiny else 4096,
        "batch": 4 if tiny else 16,
        "layers": 1 if tiny else 12,
        "width": 64 if tiny else 768,
        "steps": 3 if tiny else 3 * ns.steps,
    }
    specs = [{**chunked, "impl": i} for i in ("ember:plain", "ember:chunked", "hf:plain")]
    specs += [{**packing, "impl": i} for i in ("ember:padded", "ember:packed")]
    runs = []
    for spec in specs:
        result = run_child("bench.gpu_perf", spec, timeout=900)
        runs.append(result)
        state = "ok" if result.get("ok") else "FAILED: " + str(result.get("error"))[-800:]
        print(f"{spec['part']} {spec['impl']}: {state}", file=sys.stderr, flush=True)
    payload = {"machine": machine(), "argv": args_list, "runs": runs}
    tag = ns.tag or ("gpu_perf-cpu-smoke" if tiny else "gpu_perf")
    write_results(tag, payload, render(payload))
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
