"""DeepSpeed ZeRO 0/2/3 on 2 CPU processes (gloo): equal to DDP within float tolerance, with
"auto" config values filled from TrainingArguments and pickle-free per-rank checkpoints that
resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ember.checkpoint import verify_checkpoint
from tests.pickle_check import assert_no_pickle
from tests.strategy.conftest import max_diff, run_suite

pytest.importorskip("deepspeed")

QUIET = {"PYTHONWARNINGS": "ignore::FutureWarning"}


@pytest.fixture(scope="module")
def zero02(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_suite(tmp_path_factory.mktemp("zero02"), "deepspeed", "0", "2", timeout=240)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_suite(tmp_path_factory.mktemp("zero3"), "deepspeed", "3", timeout=240)


def _state(out: Path, name: str):
    return load_file(str(out / f"{name}.safetensors"))


def test_zero0_equals_ddp(zero02):
    assert max_diff(_state(zero02, "zero0"), _state(zero02, "ds-ddp-ref")) < 1e-6


def test_zero2_equals_ddp_and_resumes_exactly(zero02):
    assert max_diff(_state(zero02, "zero2"), _state(zero02, "ds-ddp-ref")) < 1e-6
    assert max_diff(_state(zero02, "zero2"), _state(zero02, "zero2-resume")) == 0.0
    folder = zero02 / "zero2-resume" / "checkpoint-4"
    assert verify_checkpoint(folder) is None
    assert (folder / "deepspeed-rank-0.safetensors").exists() and (folder / "deepspeed-rank-1.json").exists()
    assert_no_pickle(folder)


def test_zero3_equals_ddp_and_resumes_exactly(zero3):
    assert max_diff(_state(zero3, "zero3"), _state(zero3, "ds-ddp-ref")) < 1e-6
    assert max_diff(_state(zero3, "zero3"), _state(zero3, "zero3-resume")) == 0.0
    assert_no_pickle(zero3 / "zero3-resume")


@pytest.fixture(scope="module")
def spikes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_suite(tmp_path_factory.mktemp("ds-spikes"), "spike-deepspeed", "2", "3", timeout=300)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_loss_spike_is_rolled_back_under_zero(spikes, stage):
    # Step 5's loss is 100 times too large: its update is dropped and the weights go back to the
    # copy kept after step 3 (through the engine's own state: ZeRO-3's partitions too); step 6
    # then runs from there exactly as under DDP, so the optimizer moments were rolled back as well.
    name = f"ds-spike-zero{stage}"
    meta = json.loads((spikes / f"{name}.json").read_text())
    assert meta["rollbacks"] == [[1, 1]]  # step 5: epoch 1, its second step
    assert meta["global_step"] == 6
    got = _state(spikes, name)
    step3 = {k.replace("step3.", "param."): v for k, v in got.items() if k.startswith("step3.")}
    step5 = {k.replace("step5.", "param."): v for k, v in got.items() if k.startswith("step5.")}
    assert max_diff(step5, step3) == 0.0
    assert max_diff(got, _state(spikes, "ds-spike-ddp")) < 1e-6
    ddp = json.loads((spikes / "ds-spike-ddp.json").read_text())
    assert ddp["rollbacks"] == [[1, 1]]
    assert meta["losses"] == pytest.approx(ddp["losses"], abs=1e-5)


def test_a_rollback_deepspeed_cannot_do_is_refused_before_any_step(spikes):
    for rank in (0, 1):
        message = (spikes / f"nvme-refused-rank{rank}.txt").read_text()
        assert "loss_spike_zscore" in message and "NVMe" in message and "offload_optimizer" in message
        assert not (spikes / "nvme").exists()  # refused before the run took its output folder
