"""Chunked loss and packing on 2 processes (gloo): the numbers of one process with twice the batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.strategy import launch
from tests.strategy.conftest import max_diff


@pytest.fixture(scope="module")
def perf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("perf")
    launch.check(launch.run(["-m", "tests.strategy.perf_worker", str(out)], 2, timeout=240))
    return out


@pytest.mark.parametrize("name", ["chunked", "chunked-unused", "chunked-fsdp", "packed", "packed-chunked"])
def test_two_ranks_equal_one_padded_plain_process(perf, single_reference, name):
    # The reference: plain loss, padded batches of 4 on one process, GA=2, 5 steps.
    state = load_file(str(perf / f"{name}.safetensors"))
    meta = json.loads((perf / f"{name}.json").read_text())
    assert len(meta["losses"]) == 5
    assert meta["losses"] == pytest.approx(single_reference["losses"], rel=1e-5)
    assert meta["train_loss"] == pytest.approx(single_reference["train_loss"], rel=1e-5)
    assert max_diff(state, single_reference["state"]) < 1e-5
