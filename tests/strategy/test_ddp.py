"""DDP on 2 CPU processes (gloo): the same numbers as one process with twice the batch, exact
resume, SIGTERM on one rank, a failing checkpoint write on one rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember.checkpoint import verify_checkpoint
from tests.pickle_check import assert_no_pickle
from tests.strategy.conftest import max_diff, run_suite


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_suite(tmp_path_factory.mktemp("ddp"), "ddp")


def _result(out: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    meta = out / f"{name}.json"
    return load_file(str(out / f"{name}.safetensors")), json.loads(meta.read_text()) if meta.exists() else {}


def test_two_ranks_equal_one_process_with_twice_the_batch(ddp, single_reference):
    # GA=2, variable-length padded LM batches, each rank padding its own batch differently.
    state, meta = _result(ddp, "ddp")
    assert max_diff(state, single_reference["state"]) < 1e-6
    assert meta["losses"] == pytest.approx(single_reference["losses"], abs=1e-6)
    assert len(meta["losses"]) == 5
    assert meta["train_loss"] == pytest.approx(single_reference["train_loss"], abs=1e-6)


def test_eval_and_predict_on_two_ranks_match_one_process(ddp, single_reference):
    # 13 samples in batches of 2: rank 0 gets 4 batches, rank 1 three and one padding batch.
    state, meta = _result(ddp, "ddp")
    ref = single_reference
    assert meta["eval"]["eval_rows"] == 13.0
    assert meta["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], abs=1e-6)
    assert meta["eval"]["eval_accuracy"] == ref["eval"]["eval_accuracy"]
    assert state["predictions"].shape == ref["state"]["predictions"].shape
    assert torch.equal(state["label_ids"], ref["state"]["label_ids"])
    assert torch.allclose(state["predictions"], ref["state"]["predictions"], atol=1e-5)


def test_resume_with_async_save_is_bit_exact(ddp):
    uninterrupted, _ = _result(ddp, "ddp")
    resumed, _ = _result(ddp, "ddp-resume")
    assert max_diff(uninterrupted, resumed) == 0.0


def test_every_rank_writes_its_state_into_one_checkpoint(ddp):
    folder = ddp / "ddp-resume" / "checkpoint-4"
    assert verify_checkpoint(folder) is None
    names = {p.name for p in folder.iterdir()}
    assert {"rank-0.json", "rank-1.json", "model.safetensors", "optimizer.json", "manifest.json"} <= names
    assert not list(folder.parent.glob("*.tmp"))
    assert_no_pickle(folder.parent)


def test_dropout_augmentation_and_workers_resume_exactly_per_rank(ddp):
    ref, resumed = (
        load_file(str(ddp / "reg-ref.safetensors")),
        load_file(str(ddp / "reg-resumed.safetensors")),
    )
    assert ref.keys() == resumed.keys()
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_sigterm_on_one_rank_checkpoints_every_rank_at_the_same_step(ddp):
    # The worker checked that both ranks stopped at step 3 with checkpoint-3 complete.
    uninterrupted, _ = _result(ddp, "ddp")
    resumed, _ = _result(ddp, "preempt")
    assert max_diff(uninterrupted, resumed) == 0.0
    assert verify_checkpoint(ddp / "preempt" / "checkpoint-3") is None


def test_a_failed_write_on_one_rank_stops_all_and_keeps_older_checkpoints(ddp):
    rank0 = json.loads((ddp / "failing.json").read_text())
    rank1 = json.loads((ddp / "failing-rank1.json").read_text())
    assert rank0["folders"] == ["checkpoint-2"]
    assert (
        "rank(s) [1]" in rank0["message"] and "intact (newest complete one: checkpoint-2)" in rank0["message"]
    )
    assert "No space left on device" in rank1["message"]


def test_activation_checkpointing_under_ddp_gives_the_same_weights(ddp):
    plain, meta = _result(ddp, "ddp")
    checkpointed, meta_ac = _result(ddp, "ddp-ac")
    assert max_diff(plain, checkpointed) < 1e-6
    assert meta["losses"] == pytest.approx(meta_ac["losses"], abs=1e-6)


def test_ddp_static_graph_gives_the_same_weights(ddp):
    plain, meta = _result(ddp, "ddp")
    static, meta_static = _result(ddp, "ddp-static")
    assert max_diff(plain, static) < 1e-6
    assert meta["losses"] == pytest.approx(meta_static["losses"], abs=1e-6)


def test_lora_under_ddp_resumes_bit_exactly_from_its_adapter_checkpoint(ddp):
    uninterrupted, meta = _result(ddp, "ddp-lora")
    resumed, meta_resumed = _result(ddp, "ddp-lora-resume")
    params = [k for k in uninterrupted if k.startswith("param.")]
    assert any("lora_" in k for k in params) and params == [k for k in resumed if k.startswith("param.")]
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in params)
    assert meta["losses"] == meta_resumed["losses"]
    ckpt = ddp / "ddp-lora-resume" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()


def test_a_nan_on_one_rank_or_no_targets_anywhere_makes_every_rank_skip_the_step(tmp_path):
    # Rank 1 alone has a NaN loss at step 3: the all-reduced gradients are NaN on both ranks, so
    # both skip it. Step 4 has no target on either rank: skipped on both. Step 1 has none on rank
    # 0 only: a normal step. The ranks stay equal and finite.
    run_suite(tmp_path, "nonfinite")
    ranks = [json.loads((tmp_path / f"nonfinite-rank{r}.json").read_text()) for r in (0, 1)]
    for summary in ranks:
        assert summary["finite"]
        assert summary["nonfinite_steps"] == 1
        assert summary["empty_steps"] == 1
        assert summary["global_step"] == 5
        # Neither skipped step has a loss (not a loss of 0): their entries say they skipped, and
        # train_loss is the mean of the three real steps.
        assert summary["skipped"] == [None, None, 1.0, 1.0, None]
        assert len(summary["losses"]) == 3 and all(x > 0 for x in summary["losses"])
        assert summary["train_loss"] == pytest.approx(sum(summary["losses"]) / 3)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    spikes = [json.loads((tmp_path / f"spike-ddp-rank{r}.json").read_text()) for r in (0, 1)]
    for summary in spikes:
        assert summary["finite"] and summary["rollbacks"] == [[1, 1]]  # step 5: epoch 1, its second step
    assert spikes[0]["checksum"] == spikes[1]["checksum"]
