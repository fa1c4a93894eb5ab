"""Seq2SeqTrainer on 2 CPU processes (gloo): DDP, FSDP2 and ZeRO-3 give the single-process run with
twice the per-device batch: the same losses and weights, the same generated ids (beam search in
evaluate, greedy in predict) and metrics, with the ranks' padding rows cut from the gathered arrays."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.strategy import launch
from tests.strategy.conftest import max_diff

pytest.importorskip("transformers")


def _suite(out: Path, suite: str) -> Path:
    args = ["-m", "tests.strategy.seq2seq_worker", suite, str(out)]
    launch.check(launch.run(args, nproc=2, timeout=300, env={"PYTHONWARNINGS": "ignore"}))
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _suite(tmp_path_factory.mktemp("s2s-ddp"), "ddp")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _suite(tmp_path_factory.mktemp("s2s-sharded"), "sharded")


def _reference(tmp_path_factory: pytest.TempPathFactory, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    from tests.seq2seq_job import job_trainer, run_job

    out = tmp_path_factory.mktemp(f"s2s-single-{kind}")
    return run_job(job_trainer(str(out), kind, per_device_train_batch_size=4))


@pytest.fixture(scope="module")
def bart_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict]:
    return _reference(tmp_path_factory, "bart")


def _load(out: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(out / f"{name}.safetensors")), json.loads((out / f"{name}.json").read_text())


def _assert_equal_runs(got: tuple[dict, dict], want: tuple[dict, dict], weights: float) -> None:
    (state, meta), (ref_state, ref) = got, want
    assert max_diff(state, ref_state) < weights
    assert meta["losses"] == pytest.approx(ref["losses"], abs=1e-5) and len(meta["losses"]) == 30
    # 13 eval samples in batches of 2: rank 1 pads its last batch; the gathered rows are cut back.
    assert meta["eval"]["eval_rows"] == 13.0
    assert meta["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], abs=1e-5)
    for key in ("eval_exact_match", "eval_overlap", "eval_gen_len", "eval_width"):
        assert meta["eval"][key] == ref["eval"][key], key
    assert meta["test"]["test_loss"] == pytest.approx(ref["test"]["test_loss"], abs=1e-5)
    assert torch.equal(state["predictions"], ref_state["predictions"])
    assert torch.equal(state["label_ids"], ref_state["label_ids"])
    assert ref["eval"]["eval_gen_len"] > 1, "generation must produce real sequences"


def test_ddp_generates_what_one_process_generates(ddp, bart_reference):
    got = _load(ddp, "ddp-bart")
    assert got[1]["shards_parameters"] is False
    _assert_equal_runs(got, bart_reference, weights=1e-5)


def test_fsdp_generates_with_synced_ranks_what_one_process_generates(sharded, bart_reference):
    got = _load(sharded, "fsdp-bart")
    assert got[1]["shards_parameters"] is True  # so generate ran with synced_gpus=True
    # Batches of 2 dealt round-robin: rank 0's rows (2 new tokens), rank 1's (6), rank 0's again.
    assert got[1]["uneven_lengths"] == [2, 2, 6, 6, 2, 2]
    _assert_equal_runs(got, bart_reference, weights=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero3_generates_with_synced_ranks_what_one_process_generates(sharded, bart_reference):
    got = _load(sharded, "zero3-bart")
    assert got[1]["shards_parameters"] is True
    assert got[1]["uneven_lengths"] == [2, 2, 6, 6, 2, 2]
    _assert_equal_runs(got, bart_reference, weights=1e-5)
