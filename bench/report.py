"""Statistics over repetitions, paired ratios, and the Markdown report of `bench.compare`."""

from __future__ import annotations

import math
import statistics
from typing import Any

# (key, column header, format); medians over repetitions are shown.
COLUMNS = (
    ("main_s", "{main} s", "{:.2f}"),
    ("main_cpu_s", "{main} CPU s", "{:.2f}"),
    ("steps_per_s", "steps/s", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("step_ms_median", "step ms (median)", "{:.2f}"),
    ("step_cpu_ms_median", "step CPU ms (median)", "{:.2f}"),
    ("steady_step_ms", "step ms (steady)", "{:.2f}"),
    ("process_wall_s", "process s", "{:.2f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("time_to_first_step_s", "first step s", "{:.2f}"),
    ("import_torch_s", "import torch s", "{:.2f}"),
    ("import_lib_s", "import lib s", "{:.3f}"),
    ("mfu", "MFU", "{:.1%}"),
)
RATIO_KEYS = (
    ("main_s", "{main} time"),
    ("main_cpu_s", "{main} CPU time"),
    ("step_ms_median", "step ms (median)"),
    ("step_cpu_ms_median", "step CPU ms (median)"),
    ("steady_step_ms", "step ms (steady)"),
    ("peak_rss_mib", "peak RSS"),
    ("process_wall_s", "process wall"),
    ("time_to_first_step_s", "time to first step"),
)
CHECK_KEYS = ("train_loss", "eval_loss", "eval_accuracy")


def derive(run: dict[str, Any], peak_flops: float | None) -> None:
    """Rates from the raw figures a child reports (in place)."""
    main = run.get("main_s")
    if not run.get("ok") or not main:
        return
    run["steps_per_s"] = run["steps"] / main
    run["tokens_per_s"] = run["tokens"] / main
    if peak_flops and not run.get("is_eval"):
        # 6 N flops per trained token (forward 2N + backward 4N), attention ignored.
        steady = run.get("steady_step_ms")
        tokens_per_s = run["tokens_per_step"] / (steady / 1e3) if steady else run["tokens_per_s"]
        run["mfu"] = 6 * run["n_params"] * tokens_per_s / peak_flops


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def spread(values: list[Any]) -> dict[str, float] | None:
    vals = _finite(values)
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def summarise(runs: list[dict[str, Any]], pairs: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    """Per workload: each implementation's min/median/max of every figure, and paired ratios.

    A ratio is taken within one repetition (ember's run against the other run of the same round),
    so slow phases of a shared machine hit both sides; min/median/max are over the rounds.
    """
    out: dict[str, Any] = {}
    for wl in dict.fromkeys(r["workload"] for r in runs):
        ok = [r for r in runs if r["workload"] == wl and r.get("ok")]
        impls = list(dict.fromkeys(r["impl"] for r in runs if r["workload"] == wl))
        figures = {
            impl: {
                key: spread([r.get(key) for r in ok if r["impl"] == impl])
                for key, *_ in COLUMNS + tuple((k, "", "") for k in CHECK_KEYS)
            }
            for impl in impls
        }
        ratios = {}
        for num, den in pairs.get(wl, []):
            by_rep = {r["rep"]: r for r in ok if r["impl"] == den}
            ratios[f"{num}/{den}"] = {
                key: spread(
                    [
                        r[key] / by_rep[r["rep"]][key]
                        for r in ok
                        if r["impl"] == num
                        and r["rep"] in by_rep
                        and r.get(key)
                        and by_rep[r["rep"]].get(key)
                    ]
                )
                for key, _ in RATIO_KEYS
            }
        out[wl] = {
            "figures": figures,
            "ratios": ratios,
            "failed": [r for r in runs if r["workload"] == wl and not r.get("ok")],
        }
    return out


def _fmt(fmt: str, stats: dict[str, float] | None, field: str = "median") -> str:
    return "–" if stats is None else fmt.format(stats[field])


def _ratio_cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "–"
    return f"**{stats['median']:.3f}** ({stats['min']:.3f}–{stats['max']:.3f})"


def workload_section(name: str, title: str, is_eval: bool, summary: dict[str, Any]) -> list[str]:
    main = "eval" if is_eval else "train"
    cols = [c for c in COLUMNS if any(summary["figures"][i].get(c[0]) for i in summary["figures"])]
    check = "eval loss / acc" if is_eval else "train loss"
    lines = [f"## Workload {name}: {title}", ""]
    lines.append("| impl | " + " | ".join(h.format(main=main) for _, h, _ in cols) + f" | {check} |")
    lines.append("|---" * (len(cols) + 2) + "|")
    for impl, figs in summary["figures"].items():
        cells = [_fmt(fmt, figs.get(key)) for key, _, fmt in cols]
        if is_eval:
            cells.append(
                f"{_fmt('{:.4f}', figs.get('eval_loss'))} / {_fmt('{:.4f}', figs.get('eval_accuracy'))}"
            )
        else:
            cells.append(_fmt("{:.5f}", figs.get("train_loss")))
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    if summary["ratios"]:
        lines += [
            "",
            "Paired ratios, median (min–max) over rounds; below 1 means ember is faster/smaller:",
            "",
        ]
        lines.append("| ratio | " + " | ".join(h.format(main=main) for _, h in RATIO_KEYS) + " |")
        lines.append("|---" * (len(RATIO_KEYS) + 1) + "|")
        for label, stats in summary["ratios"].items():
            lines.append(
                f"| {label} | " + " | ".join(_ratio_cell(stats.get(k)) for k, _ in RATIO_KEYS) + " |"
            )
    for run in summary["failed"]:
        first = (run.get("error") or "no result").strip().splitlines()[-1]
        lines.append(f"\n**Failed**: {run['impl']} round {run['rep']}: `{first}`")
    return lines + [""]


def consistency_notes(summary: dict[str, Any], seqs: dict[str, int], tolerance: float = 2e-3) -> list[str]:
    """Say when the implementations did not compute the same job (their losses differ).

    transformers 5 divides a causal LM's summed loss by `num_items_in_batch` counted *before* the
    label shift (seq targets per row instead of seq - 1), so its losses are (seq - 1) / seq of the
    true mean; that known factor is reported as such rather than as a mismatch.
    """
    notes = []
    for wl, s in summary.items():
        seq = seqs.get(wl.split("+")[0])
        for key in ("train_loss", "eval_loss"):
            vals = {i: f[key]["median"] for i, f in s["figures"].items() if f.get(key)}
            ref = vals.get("raw")
            if ref is None or len(vals) < 2:
                continue
            for impl, value in vals.items():
                if abs(value - ref) <= tolerance * abs(ref):
                    continue
                if (
                    impl.startswith("hf")
                    and seq
                    and abs(value - ref * (seq - 1) / seq) <= tolerance * abs(ref)
                ):
                    notes.append(
                        f"workload {wl}: {impl} {key} = {value:.5f} = raw's {ref:.5f} x (seq-1)/seq: "
                        "transformers counts num_items_in_batch before the causal shift "
                        "(same training up to that scale)"
                    )
                else:
                    notes.append(f"workload {wl}: {impl} {key} = {value:.5f} differs from raw's {ref:.5f}")
    return notes


def targets_section(summary: dict[str, Any]) -> list[str]:
    """The project's targets, read off workloads a and b where they ran."""
    lines = ["## Targets", "", "| target | workload | median | met |", "|---|---|---|---|"]

    def row(label: str, wl: str, value: float | None, limit: float, unit: str = "") -> None:
        if value is None:
            return
        lines.append(
            f"| {label} (<= {limit}{unit}) | {wl} | {value:.3f}{unit} | {'yes' if value <= limit else 'no'} |"
        )

    for wl in ("a", "b"):
        s = summary.get(wl)
        if not s:
            continue
        for ratio, key, limit, label in (
            ("ember/raw", "main_s", 1.01, "ember/raw train time"),
            ("ember/raw", "main_cpu_s", 1.01, "ember/raw train CPU time"),
            ("ember/raw", "step_ms_median", 1.01, "ember/raw step time (median)"),
            ("ember/hf", "main_s", 0.96, "ember/HF train time"),
            ("ember/hf", "main_cpu_s", 0.96, "ember/HF train CPU time"),
            ("ember/raw", "peak_rss_mib", 1.03, "ember/raw peak RSS"),
        ):
            stats = s["ratios"].get(ratio, {}).get(key)
            row(label, wl, stats["median"] if stats else None, limit)
        lib = s["figures"].get("ember", {}).get("import_lib_s")
        row("`import ember` + Trainer over `import torch`", wl, lib["median"] if lib else None, 0.15, " s")
    return lines + [""]
