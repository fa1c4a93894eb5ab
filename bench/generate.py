"""`evaluate()` with `predict_with_generate=True`: ember's Seq2SeqTrainer against transformers', on CPU.

    python -m bench.generate                  # tiny BART, beams 1 and 4, 5 rounds of 6 alternating calls
    python -m bench.generate --smoke          # tiny sizes, 1 round: checks that it runs

Each round is a fresh process (`python -m bench.generate --child ...`) per beam setting holding both
trainers, each with its own copy of the model (BART from a config under a fixed seed) and the same
eval set. After one untimed evaluate() each (first-touch allocations, lazy imports), it times `--reps`
evaluate() calls of each, alternating ember and transformers (and who goes first), so both meet the
same load on a shared machine: wall time and this process's CPU time (one thread; CPU time is what
the code costs, robust to other processes). Tables show the medians over rounds of each process's
median, and the median of the ember/transformers ratios of consecutive calls (below 1: ember faster).

Generation runs to a fixed length (`min_new_tokens = max_new_tokens` in the GenerationConfig both
trainers get as `generation_config`): an untrained model would otherwise stop at once, and the
timing would not be of generation. Both trainers also report the predictions' checksum and the
metrics, so the table shows they computed the same thing. Results: bench/results/generate.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from typing import Any

from bench.perf_common import fmt, machine, med, run_child, write_results

IMPLS = ("ember", "hf")


def _bart(spec: dict[str, Any]) -> Any:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=spec["vocab"],
        d_model=spec["width"],
        encoder_layers=spec["layers"],
        decoder_layers=spec["layers"],
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * spec["width"],
        decoder_ffn_dim=2 * spec["width"],
        max_position_embeddings=max(128, spec["max_src"] + 2, spec["new_tokens"] + 2),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    return BartForConditionalGeneration(config)


def _examples(spec: dict[str, Any]) -> list[dict[str, list[int]]]:
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(spec["samples"]):
        length = int(torch.randint(spec["min_src"], spec["max_src"] + 1, (1,), generator=g))
        src = torch.randint(4, spec["vocab"], (length,), generator=g).tolist() + [2]
        tgt = torch.randint(4, spec["vocab"], (spec["tgt"],), generator=g).tolist() + [2]
        out.append({"input_ids": src, "attention_mask": [1] * len(src), "labels": tgt})
    return out


def _collate(features: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Right-pad sources with the pad id (1) and labels with -100; decoder inputs from the labels."""
    import torch

    src = max(len(f["input_ids"]) for f in features)
    tgt = max(len(f["labels"]) for f in features)
    labels = torch.tensor([f["labels"] + [-100] * (tgt - len(f["labels"])) for f in features])
    decoder = torch.full_like(labels, 2)
    decoder[:, 1:] = labels[:, :-1]
    return {
        "input_ids": torch.tensor([f["input_ids"] + [1] * (src - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor(
            [f["attention_mask"] + [0] * (src - len(f["attention_mask"])) for f in features]
        ),
        "labels": labels,
        "decoder_input_ids": decoder.masked_fill(decoder == -100, 1),
    }


def _metrics(pred: Any) -> dict[str, float]:
    import numpy as np

    preds = pred.predictions
    return {"gen_tokens": float(np.count_nonzero((preds != -100) & (preds != 1))), "rows": float(len(preds))}


def _trainer(impl: str, spec: dict[str, Any], out: str) -> Any:
    from transformers import GenerationConfig

    if impl == "hf":
        from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    else:
        from ember import Seq2SeqTrainer, Seq2SeqTrainingArguments
    model = _bart(spec)
    generation = GenerationConfig.from_model_config(model.config)
    generation.update(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"])
    args = Seq2SeqTrainingArguments(
        output_dir=out,
        per_device_eval_batch_size=spec["batch"],
        predict_with_generate=True,
        generation_num_beams=spec["beams"],
        generation_config=generation,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return Seq2SeqTrainer(
        model=model, args=args, eval_dataset=_examples(spec), data_collator=_collate, compute_metrics=_metrics
    )


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Both trainers in this process, each on its own copy of the model, timed alternately (who goes
    first alternates too), so each pair of evaluate() calls meets the same machine load."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    times: dict[str, dict[str, list[float]]] = {impl: {"wall": [], "cpu": []} for impl in IMPLS}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as out:
        trainers = {impl: _trainer(impl, spec, f"{out}/{impl}") for impl in IMPLS}
        for trainer in trainers.values():
            trainer.evaluate()  # warm-up, untimed
        for rep in range(spec["reps"]):
            for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
                start, start_cpu = time.perf_counter(), time.process_time()
                metrics = trainers[impl].evaluate()
                times[impl]["wall"].append(time.perf_counter() - start)
                times[impl]["cpu"].append(time.process_time() - start_cpu)
                results[impl] = {"eval_loss": metrics["eval_loss"], "gen_tokens": metrics["eval_gen_tokens"]}
        for impl, trainer in trainers.items():
            pred = trainer.predict(_examples(spec)[: spec["batch"]]).predictions
            results[impl]["predictions_sha1"] = hashlib.sha1(
                np.ascontiguousarray(pred).tobytes()
            ).hexdigest()[:12]
            results[impl]["predictions_shape"] = list(pred.shape)
    for impl in IMPLS:
        results[impl].update(
            eval_s=statistics.median(times[impl]["wall"]),
            eval_cpu_s=statistics.median(times[impl]["cpu"]),
            eval_s_all=times[impl]["wall"],
            eval_cpu_s_all=times[impl]["cpu"],
        )
    ratios = {
        kind: [e / h for e, h in zip(times["ember"][kind], times["hf"][kind])] for kind in ("wall", "cpu")
    }
    return {**spec, "ok": True, "impls": results, "ratios": ratios}


def summarise(runs: list[dict[str, Any]], beams_list: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for beams in beams_list:
        mine = [r for r in runs if r.get("ok") and r["beams"] == beams]
        rows = {}
        for impl in IMPLS:
            if mine:
                first = mine[0]["impls"][impl]
                rows[impl] = {
                    "eval_s": med([r["impls"][impl]["eval_s"] for r in mine]),
                    "eval_cpu_s": med([r["impls"][impl]["eval_cpu_s"] for r in mine]),
                    "eval_loss": first["eval_loss"],
                    "gen_tokens": first["gen_tokens"],
                    "predictions_sha1": first["predictions_sha1"],
                    "runs": len(mine),
                }
        ratios = {}
        for kind in ("wall", "cpu"):
            paired = [x for r in mine for x in r["ratios"][kind]]
            if paired:
                ratios[kind] = {
                    "median": statistics.median(paired),
                    "min": min(paired),
                    "max": max(paired),
                    "pairs": len(paired),
                }
        same = len(rows) == 2 and rows["ember"]["predictions_sha1"] == rows["hf"]["predictions_sha1"]
        summary[str(beams)] = {"rows": rows, "ratios": ratios, "same_predictions": same}
    return summary


def render(payload: dict[str, Any]) -> str:
    m, cfg = payload["machine"], payload["config"]
    lines = [
        f"# evaluate() with predict_with_generate: ember vs transformers Seq2SeqTrainer ({m['date_utc']})",
        "",
        f"- {m['platform']}, python {m['python']}, torch {m['torch']}, transformers {m.get('transformers')}",
        f"- ember at {m.get('ember_commit')}; 1 thread, OMP_WAIT_POLICY=PASSIVE; "
        f"load average {m['load_avg']}",
        f"- BART {cfg['layers']}+{cfg['layers']} layers x {cfg['width']} wide, vocab {cfg['vocab']}, fp32; "
        f"{cfg['samples']} eval samples (sources {cfg['min_src']}-{cfg['max_src']} tokens), "
        f"batch {cfg['batch']}, {cfg['new_tokens']} new tokens per row",
        f"- {cfg['rounds']} round(s), each a fresh process holding both trainers: one warm-up evaluate() "
        f"each, then {cfg['reps']} timed evaluate() each, alternating (and alternating who goes first); "
        "times are medians over rounds of each process's median; ratio = ember / transformers over every "
        "pair of consecutive calls",
        "- command: `python -m bench.generate " + " ".join(cfg["argv"]) + "`",
        "",
        "| beams | impl | evaluate() wall s | evaluate() CPU s | eval_loss | generated tokens "
        "| predictions |",
        "|---|---|---|---|---|---|---|",
    ]
    for beams, block in payload["summary"].items():
        for impl, row in block["rows"].items():
            name = {"ember": "ember", "hf": "transformers"}[impl]
            lines.append(
                f"| {beams} | {name} | {fmt(row['eval_s'], 3)} | {fmt(row['eval_cpu_s'], 3)} | "
                f"{row['eval_loss']:.6f} | {int(row['gen_tokens'])} | {row['predictions_sha1']} |"
            )
    lines += [
        "",
        "| beams | ratio | median | min | max | pairs | same predictions |",
        "|---|---|---|---|---|---|---|",
    ]
    for beams, block in payload["summary"].items():
        for kind, r in block["ratios"].items():
            lines.append(
                f"| {beams} | ember/transformers {kind} | {r['median']:.3f} | {r['min']:.3f} | "
                f"{r['max']:.3f} | {r['pairs']} | {'yes' if block['same_predictions'] else 'NO'} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generate")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--beams", default="1,4")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--min-src", dest="min_src", type=int, default=16)
    p.add_argument("--max-src", dest="max_src", type=int, default=48)
    p.add_argument("--tgt", type=int, default=16)
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round")
    p.add_argument("--tag", default=None)
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    if ns.child:
        result = child(json.loads(ns.child))
        with open(ns.out, "w") as f:
            json.dump(result, f)
        return 0
    if ns.smoke:
        ns.samples, ns.batch, ns.new_tokens, ns.width, ns.vocab, ns.reps, ns.rounds = 8, 4, 4, 16, 64, 1, 1
    beams_list = [int(b) for b in ns.beams.split(",")]
    keys = ("samples", "batch", "min_src", "max_src", "tgt", "new_tokens", "layers", "width", "vocab", "reps")
    base = {k: getattr(ns, k) for k in keys}
    runs = []
    for round_ in range(ns.rounds):
        for beams in beams_list:
            result = run_child("bench.generate", {**base, "beams": beams, "round": round_})
            runs.append(result)
            state = "ok" if result.get("ok") else "FAILED: " + str(result.get("error"))[-500:]
            print(f"round {round_} beams {beams}: {state}", file=sys.stderr, flush=True)
    config = {**base, "rounds": ns.rounds, "argv": sys.argv[1:] if argv is None else argv}
    payload = {"machine": machine(), "config": config, "runs": runs, "summary": summarise(runs, beams_list)}
    write_results(ns.tag or ("generate-smoke" if ns.smoke else "generate"), payload, render(payload))
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
