"""Peak memory and step time of training steps with a large vocabulary: ember's plain loss, ember's
chunked loss (`chunked_loss=True`) and the transformers Trainer, on CPU.

    python -m bench.chunked_loss                       # vocab 32k and 128k, seq 1024, batch 2, 3 rounds
    python -m bench.chunked_loss --smoke               # tiny sizes, 1 round: checks that it runs

Each measurement is a fresh process (peak RSS is per process), interleaved plain, chunked, hf per
round; tables show medians. Model: GPT-2 2 layers x 256 wide (tied embeddings), fp32, one thread.
Step memory = peak RSS during train() minus the RSS just before it (model and data built); the
optimizer state (created in train()) is part of it for all three. Step time = median of steps
2..N (the first allocates), as this process's CPU time (one thread: what the step costs, robust to
other load on a shared machine) and as wall time. Labels are `input_ids` with the first position
-100: it is never a target after the causal shift, and that way transformers' `num_items_in_batch`
(counted before the shift) equals the true target count, so all three report the same loss. Results:
bench/results/chunked_loss.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

from bench.perf_common import (
    current_rss_mib,
    fmt,
    machine,
    med,
    median_step_ms,
    peak_rss_mib,
    run_child,
    step_clock_callback,
    write_results,
)

IMPLS = ("plain", "chunked", "hf")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    if spec["impl"] == "hf":
        from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    else:
        from ember import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=spec["vocab"],
        n_positions=spec["seq"],
        n_embd=spec["width"],
        n_layer=spec["layers"],
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(spec["steps"] * spec["batch"]):
        ids = torch.randint(0, spec["vocab"], (spec["seq"],), generator=g)
        labels = ids.clone()
        labels[0] = -100
        data.append({"input_ids": ids, "labels": labels})
    # ember's plain runs say chunked_loss=False: its default chunks a micro-batch of this size
    chunked = spec["impl"] == "chunked"
    extra = {"chunked_loss": chunked, "loss_chunk_size": spec["chunk"]} if spec["impl"] != "hf" else {}
    clock = step_clock_callback(TrainerCallback)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch"],
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            seed=0,
            **extra,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=default_data_collator, callbacks=[clock]
        )
        before = current_rss_mib()
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = peak_rss_mib()
    return {
        **spec,
        "ok": True,
        "rss_before_train_mib": before,
        "peak_rss_mib": peak,
        "step_peak_mib": peak - before,
        "step_ms": median_step_ms(clock.times, start),
        "step_cpu_ms": median_step_ms(clock.cpu, start_cpu),
        "losses": losses,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def summarise(runs: list[dict[str, Any]], vocabs: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for vocab in vocabs:
        rows = {}
        for impl in IMPLS:
            mine = [r for r in runs if r.get("ok") and r["vocab"] == vocab and r["impl"] == impl]
            if not mine:
                continue
            rows[impl] = {
                "step_ms": med([r["step_ms"] for r in mine]),
                "step_cpu_ms": med([r["step_cpu_ms"] for r in mine]),
                "step_peak_mib": med([r["step_peak_mib"] for r in mine]),
                "peak_rss_mib": med([r["peak_rss_mib"] for r in mine]),
                "first_loss": mine[0]["losses"][0],
                "last_loss": mine[0]["losses"][-1],
                "runs": len(mine),
            }
        ratios = {}
        if "chunked" in rows and "hf" in rows:
            ratios["chunked/hf step CPU time"] = rows["chunked"]["step_cpu_ms"] / rows["hf"]["step_cpu_ms"]
            ratios["chunked/hf step memory"] = rows["chunked"]["step_peak_mib"] / rows["hf"]["step_peak_mib"]
            ratios["chunked/hf peak RSS"] = rows["chunked"]["peak_rss_mib"] / rows["hf"]["peak_rss_mib"]
            ratios["chunked vs hf first loss (rel)"] = abs(
                rows["chunked"]["first_loss"] / rows["hf"]["first_loss"] - 1
            )
        if "chunked" in rows and "plain" in rows:
            ratios["chunked/plain step CPU time"] = (
                rows["chunked"]["step_cpu_ms"] / rows["plain"]["step_cpu_ms"]
            )
            ratios["chunked/plain step wall time"] = rows["chunked"]["step_ms"] / rows["plain"]["step_ms"]
            ratios["chunked/plain step memory"] = (
                rows["chunked"]["step_peak_mib"] / rows["plain"]["step_peak_mib"]
            )
            ratios["chunked vs plain last loss (rel)"] = abs(
                rows["chunked"]["last_loss"] / rows["plain"]["last_loss"] - 1
            )
        summary[str(vocab)] = {"rows": rows, "ratios": ratios}
    return summary


def render(payload: dict[str, Any]) -> str:
    m, cfg = payload["machine"], payload["config"]
    lines = [
        f"# Chunked cross-entropy: memory and step time with a large vocabulary ({m['date_utc']})",
        "",
        f"- {m['platform']}, python {m['python']}, torch {m['torch']}, transformers {m.get('transformers')}",
        f"- ember at {m.get('ember_commit')}; 1 thread, OMP_WAIT_POLICY=PASSIVE; "
        f"load average {m['load_avg']}",
        f"- GPT-2 {cfg['layers']}x{cfg['width']} (tied), seq {cfg['seq']}, batch {cfg['batch']}, "
        f"{cfg['steps']} steps, fp32, AdamW; chunk {cfg['chunk']} tokens; {cfg['rounds']} interleaved "
        "round(s), medians; a fresh process per measurement",
        "- step memory = peak RSS during train() - RSS before it (includes AdamW state, same for all)",
        "- step CPU ms = the process's CPU time per step (1 thread), median of steps 2..N; wall ms beside it",
        "- command: `python -m bench.chunked_loss " + " ".join(cfg["argv"]) + "`",
        "",
    ]
    for vocab, block in payload["summary"].items():
        lines += [
            f"## vocab {int(vocab):,}",
            "",
            "| impl | step CPU ms | step wall ms | step memory MiB | peak RSS MiB | loss step 1 | loss "
            "last |",
            "|---|---|---|---|---|---|---|",
        ]
        for impl, row in block["rows"].items():
            name = {"plain": "ember", "chunked": "ember chunked_loss", "hf": "transformers"}[impl]
            lines.append(
                f"| {name} | {fmt(row['step_cpu_ms'])} | {fmt(row['step_ms'])} | "
                f"{fmt(row['step_peak_mib'], 0)} | {fmt(row['peak_rss_mib'], 0)} | "
                f"{row['first_loss']:.6f} | {row['last_loss']:.6f} |"
            )
        lines += ["", "| ratio | value |", "|---|---|"]
        for key, value in block["ratios"].items():
            lines.append(f"| {key} | {value:.3g} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chunked_loss")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--vocabs", default="32000,128000")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round")
    p.add_argument("--tag", default=None)
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    if ns.child:
        result = child(json.loads(ns.child))
        with open(ns.out, "w") as f:
            json.dump(result, f)
        return 0
    if ns.smoke:
        ns.vocabs, ns.seq, ns.batch, ns.steps, ns.rounds, ns.width, ns.chunk = "1000", 32, 2, 3, 1, 32, 16
    vocabs = [int(v) for v in ns.vocabs.split(",")]
    keys = ("seq", "batch", "steps", "layers", "width", "chunk")
    base = {k: getattr(ns, k) for k in keys}
    runs = []
    for round_ in range(ns.rounds):
        for vocab in vocabs:
            for impl in IMPLS:
                result = run_child("bench.chunked_loss", {**base, "vocab": vocab, "impl": impl})
                result["round"] = round_
                runs.append(result)
                state = "ok" if result.get("ok") else "FAILED: " + str(result.get("error"))[-500:]
                print(f"round {round_} vocab {vocab} {impl}: {state}", file=sys.stderr, flush=True)
    config = {**base, "rounds": ns.rounds, "argv": sys.argv[1:] if argv is None else argv}
    payload = {"machine": machine(), "config": config, "runs": runs, "summary": summarise(runs, vocabs)}
    write_results(ns.tag or ("chunked_loss-smoke" if ns.smoke else "chunked_loss"), payload, render(payload))
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
