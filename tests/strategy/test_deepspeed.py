"""DeepSpeed ZeRO 0/2/3 on 2 CPU processes (gloo): equal to DDP within float tolerance, with
"auto" config values filled from TrainingArguments and pickle-free per-rank checkpoints that
resume exactly."""

from __future__ import annotations

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
