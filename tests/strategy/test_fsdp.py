"""FSDP2 (fully_shard) on 2 CPU processes: equal to DDP, exact resume, pickle-free sharded
checkpoints that reshard (2 ranks -> 1 and 1 -> 2), and a consolidated model for from_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember.checkpoint import verify_checkpoint
from tests.pickle_check import assert_no_pickle
from tests.strategy.conftest import max_diff, run_suite


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_suite(tmp_path_factory.mktemp("fsdp"), "fsdp")


def _state(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{name}.safetensors"))


def _meta(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_fsdp_equals_ddp(fsdp):
    assert max_diff(_state(fsdp, "fsdp"), _state(fsdp, "ddp-ref")) < 1e-6
    assert _meta(fsdp, "fsdp")["losses"] == pytest.approx(_meta(fsdp, "ddp-ref")["losses"], abs=1e-6)


def test_fsdp_equals_one_process_with_twice_the_batch(fsdp, single_reference):
    assert max_diff(_state(fsdp, "fsdp"), single_reference["state"]) < 1e-6
    ev = _meta(fsdp, "fsdp")["eval"]
    assert ev["eval_rows"] == 13.0
    assert ev["eval_loss"] == pytest.approx(single_reference["eval"]["eval_loss"], abs=1e-6)
    predictions = _state(fsdp, "fsdp")["predictions"]
    assert torch.allclose(predictions, single_reference["state"]["predictions"], atol=1e-5)


def test_fsdp_resume_with_async_save_is_exact(fsdp):
    assert max_diff(_state(fsdp, "fsdp"), _state(fsdp, "fsdp-resume")) == 0.0


def test_sharded_checkpoint_is_pickle_free_and_loads_with_from_pretrained(fsdp):
    from transformers import AutoModelForCausalLM

    folder = fsdp / "fsdp-resume" / "checkpoint-4"
    assert verify_checkpoint(folder) is None
    shards = sorted(p.name for p in (folder / "sharded").iterdir())
    assert len(shards) == 2 and all(s.endswith(".safetensors") for s in shards)  # one per rank
    assert_no_pickle(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32, 96)


def _copy_run(src: Path, dst: Path, keep: str) -> Path:
    dst.mkdir(parents=True)
    shutil.copytree(src / keep, dst / keep)
    return dst


def test_two_rank_checkpoint_resumes_on_one_and_back_on_two(fsdp, tmp_path):
    # Step k on 2 ranks x batch 2 covers the same samples as step k on 1 rank x batch 4, so a run
    # that changes world size at a checkpoint must still end where the 2-rank run ended.
    target = _state(fsdp, "fsdp")
    one = _copy_run(fsdp / "fsdp-resume", tmp_path / "one", "checkpoint-2")
    run_suite(tmp_path, "resume", "--run", str(one), "--name", "on-one", "--batch", "4", "--fsdp", nproc=1)
    assert max_diff(_state(tmp_path, "on-one"), target) < 1e-6
    # The 1-rank run wrote checkpoint-4 with one shard; resume it on 2 ranks.
    two = _copy_run(one, tmp_path / "two", "checkpoint-4")
    assert len(list((two / "checkpoint-4" / "sharded").iterdir())) == 1
    run_suite(tmp_path, "resume", "--run", str(two), "--name", "on-two", "--batch", "2", "--fsdp", nproc=2)
    assert max_diff(_state(tmp_path, "on-two"), target) < 1e-6


def test_sharded_checkpoint_resumes_in_a_plain_single_process(fsdp, tmp_path, single_reference):
    from tests.strategy.worker import lm_state, lm_trainer

    run = _copy_run(fsdp / "fsdp-resume", tmp_path / "plain", "checkpoint-2")
    trainer = lm_trainer(str(run), per_device_train_batch_size=4)
    trainer.train(resume_from_checkpoint=True)
    assert max_diff(lm_state(trainer), _state(fsdp, "fsdp")) < 1e-6


def test_activation_checkpointing_under_fsdp_gives_the_same_weights(fsdp):
    assert max_diff(_state(fsdp, "fsdp-ac"), _state(fsdp, "fsdp")) < 1e-6
    assert _meta(fsdp, "fsdp-ac")["losses"] == pytest.approx(_meta(fsdp, "fsdp")["losses"], abs=1e-6)


def test_a_loss_spike_is_rolled_back_on_every_rank_under_fsdp(tmp_path):
    # The in-memory copy holds each rank's own shards; the decision uses the all-reduced loss.
    run_suite(tmp_path, "spike-fsdp")
    for rank in (0, 1):
        summary = json.loads((tmp_path / f"spike-fsdp-rank{rank}.json").read_text())
        assert summary["finite"] and summary["rollbacks"] == [[1, 1]]  # step 5: epoch 1, its second step
