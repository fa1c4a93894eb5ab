"""Context parallelism through `parallelism_config['cp_size']` (issue 20), on 2 and 4 gloo
processes: every layout trains 12 steps equal to one process with the same global batch while
each rank computes on half of every sequence; padding, sequence lengths that do not divide, and
packed documents keep their one-process meaning; a dp 2 x cp 2 checkpoint resumes at cp 2 and on
one process; what cannot be split is refused before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ember import Trainer, TrainingArguments
from ember.strategy.context import check_cp_model, load_balanced_index, shard_batch
from tests.strategy import launch
from tests.strategy.tp_worker import SEQ, examples, run_job, tiny

WEIGHTS_TOL, LOSS_TOL = 5e-5, 1e-4


def _launch(out: Path, jobs: list[str], nproc: int) -> None:
    launch.check(launch.run(["-m", "tests.strategy.tp_worker", str(out), ",".join(jobs)], nproc, 600))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cp")
    _launch(
        out,
        ["dpcp=llama:dp2xcp2:ckpt:eval", "cptp=llama:cp2xtp2:padded:eval", "ddpcp=llama:ddp2xcp2"],
        nproc=4,
    )
    for name in ("resume-cp2", "resume-one"):
        (out / name).mkdir()
        shutil.copytree(out / "dpcp" / "checkpoint-4", out / name / "checkpoint-4")
    _launch(
        out,
        ["cpk=llama:cp2:packed", "qcp=qwen2:cp2", "resume-cp2=llama:cp2:resume", "cpac=llama:cp2:ac"],
        nproc=2,
    )
    for spec in (
        "one=llama:one:eval",
        "onep=llama:one:padded:eval",
        "onek=llama:one:packed",
        "qone=qwen2:one",
        "resume-one=llama:one:resume",
    ):
        run_job(out, spec)
    return out


def _result(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / name / "result.json").read_text())


def _assert_equal_runs(out: Path, name: str, reference: str) -> None:
    got, ref = _result(out, name), _result(out, reference)
    assert len(got["losses"]) == len(ref["losses"]) == 12
    assert got["losses"] == pytest.approx(ref["losses"], abs=LOSS_TOL)
    assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=LOSS_TOL)
    w = load_file(str(out / name / "model" / "model.safetensors"))
    r = load_file(str(out / reference / "model" / "model.safetensors"))
    assert set(w) == set(r)
    for key in r:
        assert w[key].shape == r[key].shape, key
        assert float((w[key] - r[key]).abs().max()) < WEIGHTS_TOL, key


@pytest.mark.parametrize(
    ("name", "reference", "cp", "dp", "length"),
    [
        ("dpcp", "one", 2, 2, SEQ // 2),
        ("cptp", "onep", 2, 1, SEQ // 2),  # SEQ - 1 tokens, padded to SEQ, then split
        ("ddpcp", "one", 2, 2, SEQ // 2),
        ("cpk", "onek", 2, 1, SEQ // 2),
        ("qcp", "qone", 2, 1, SEQ // 2),
        ("cpac", "one", 2, 1, SEQ // 2),  # activation checkpointing: recomputed in backward, still split
    ],
)
def test_layout_trains_like_one_process_on_part_of_each_sequence(runs, name, reference, cp, dp, length):
    _assert_equal_runs(runs, name, reference)
    result = _result(runs, name)
    assert (result["cp_size"], result["dp_world_size"]) == (cp, dp)
    # The model really computed on its part only (a run on whole sequences would also match).
    assert result["trained_lengths"] == [length]
    assert _result(runs, reference)["trained_lengths"] in ([SEQ], [SEQ - 1])


def test_evaluation_under_context_parallelism_sees_whole_sequences(runs):
    for name, reference in (("dpcp", "one"), ("cptp", "onep")):
        got, ref = _result(runs, name)["eval"], _result(runs, reference)["eval"]
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
        assert got["rows"] == ref["rows"] == 13
        assert got["logits_sum"] == pytest.approx(ref["logits_sum"], rel=1e-5)


@pytest.mark.parametrize("name", ["resume-cp2", "resume-one"])
def test_dp2_cp2_checkpoint_resumes_with_another_layout(runs, name):
    # Resumed at step 4 from dp 2 x cp 2: the last 8 steps and the weights equal the whole run.
    got, ref = _result(runs, name), _result(runs, "one")
    assert got["global_step"] == 12
    assert got["losses"][-8:] == pytest.approx(ref["losses"][4:], abs=LOSS_TOL)
    w = load_file(str(runs / name / "model" / "model.safetensors"))
    r = load_file(str(runs / "one" / "model" / "model.safetensors"))
    assert max(float((w[k] - r[k]).abs().max()) for k in r) < WEIGHTS_TOL


# -- one process: the split and the refusals -----------------------------------------------------


def test_load_balanced_parts_cover_the_sequence_once():
    size, length = 3, 24
    parts = [load_balanced_index(length, size, r, torch.device("cpu")) for r in range(size)]
    assert sorted(torch.cat(parts).tolist()) == list(range(length))
    # Rank 0 holds the first and the last chunk: as many early (cheap) as late (costly) queries.
    assert parts[0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


def test_shard_batch_pads_shifts_before_splitting_and_keeps_global_positions():
    from ember.strategy import context

    ids = torch.arange(1, 8).reshape(1, 7)  # 7 tokens: padded to 8 for 2 ranks (4 chunks of 2)
    batch = {"input_ids": ids, "labels": ids.clone()}
    try:
        part = shard_batch(batch, None, 1, 2)  # rank 1: chunks 1 and 2
        assert part["input_ids"].tolist() == [[3, 4, 5, 6]]
        assert part["position_ids"].tolist() == [[2, 3, 4, 5]]
        # Targets shifted on the whole sequence: position 5's target is token 7 (on rank 0's side
        # of the cut), and the padding position has none.
        assert part["shift_labels"].tolist() == [[4, 5, 6, 7]]
        assert "attention_mask" not in part and part["use_cache"] is False
        rank0 = shard_batch(batch, None, 0, 2)["shift_labels"].tolist()
        assert rank0 == [[2, 3, -100, -100]]  # positions 0, 1, 6, 7: 7's target and 8 is padding
    finally:
        context.clear_shard()


def test_shard_batch_refuses_a_batch_without_causal_labels():
    with pytest.raises(ValueError, match="needs causal-LM `labels`"):
        shard_batch({"input_ids": torch.zeros(2, 8, dtype=torch.long)}, None, 0, 2)


def test_a_model_that_is_not_a_causal_lm_is_refused():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match=r"cp_size'\]=2: .*causal language models"):
        check_cp_model(model, 2, label_shift=False)


def test_a_causal_lm_without_attention_backends_is_refused():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="AttentionInterface"):
        check_cp_model(model, 2, label_shift=True)


def test_cp_sizes_that_do_not_match_the_world_size_are_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, parallelism_config={"cp_size": 2})
    with pytest.raises(ValueError, match=r"multiply to 2 \(cp_size=2\), but 1 process"):
        Trainer(model=tiny("llama"), args=args, train_dataset=examples(4))
