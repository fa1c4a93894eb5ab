"""The generate benchmark's child runs in-process at tiny sizes: structure, not speed."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_generate_bench_child_and_report():
    from bench.generate import child, render, summarise

    spec = {"samples": 8, "batch": 4, "min_src": 3, "max_src": 8, "tgt": 4, "new_tokens": 3, "layers": 1,
            "width": 16, "vocab": 40, "reps": 1, "beams": 2}  # fmt: skip
    runs = [child({**spec, "impl": impl, "round": 0}) for impl in ("ember", "hf")]
    assert all(r["ok"] and r["eval_s"] > 0 and r["eval_cpu_s"] > 0 for r in runs)
    # both trainers generated the same ids and report the same loss (whole batches: see test_seq2seq)
    assert runs[0]["predictions_sha1"] == runs[1]["predictions_sha1"]
    assert runs[0]["predictions_shape"] == [4, 20]  # 1 + 3 new tokens, padded to max_length 20
    assert runs[0]["eval_loss"] == pytest.approx(runs[1]["eval_loss"], rel=1e-5)
    summary = summarise(runs, [2])
    assert summary["2"]["same_predictions"] and summary["2"]["ratios"]["cpu"]["median"] > 0
    config = {**spec, "rounds": 1, "argv": []}
    machine = {"date_utc": "-", "platform": "-", "python": "-", "torch": "-", "load_avg": "-"}
    text = render({"machine": machine, "config": config, "summary": summary})
    assert "ember/transformers cpu" in text and "| 2 | transformers |" in text
