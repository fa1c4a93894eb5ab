"""The generate benchmark's child runs in-process at tiny sizes: structure, not speed."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_generate_bench_child_and_report():
    from bench.generate import child, render, summarise

    spec = {"samples": 8, "batch": 4, "min_src": 3, "max_src": 8, "tgt": 4, "new_tokens": 3, "layers": 1,
            "width": 16, "vocab": 40, "reps": 2, "beams": 2}  # fmt: skip
    run = child({**spec, "round": 0})
    ember, hf = run["impls"]["ember"], run["impls"]["hf"]
    assert run["ok"] and all(r["eval_s"] > 0 and r["eval_cpu_s"] > 0 for r in (ember, hf))
    # both trainers generated the same ids and report the same loss (whole batches: see test_seq2seq)
    assert ember["predictions_sha1"] == hf["predictions_sha1"]
    assert ember["predictions_shape"] == [4, 20]  # 1 + 3 new tokens, padded to max_length 20
    assert ember["eval_loss"] == pytest.approx(hf["eval_loss"], rel=1e-5)
    assert len(run["ratios"]["cpu"]) == spec["reps"]
    summary = summarise([run], [2])
    assert summary["2"]["same_predictions"] and summary["2"]["ratios"]["cpu"]["median"] > 0
    config = {**spec, "rounds": 1, "argv": []}
    machine = {"date_utc": "-", "platform": "-", "python": "-", "torch": "-", "load_avg": "-"}
    text = render({"machine": machine, "config": config, "summary": summary})
    assert "ember/transformers cpu" in text and "| 2 | transformers |" in text
