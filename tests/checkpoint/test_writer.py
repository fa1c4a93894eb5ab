from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ember.checkpoint import (
    CheckpointWriteError,
    CheckpointWriter,
    load_state,
    save_state,
    snapshot_to_cpu,
    verify_checkpoint,
)
from tests.pickle_check import assert_no_pickle


def state_writer(state: dict) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        save_state(state, folder, "optimizer")

    return write


def test_sync_save(tmp_path: Path) -> None:
    writer = CheckpointWriter(async_=False)
    writer.save(tmp_path / "checkpoint-1", state_writer({"a": torch.ones(2)}))
    assert verify_checkpoint(tmp_path / "checkpoint-1") is None
    assert_no_pickle(tmp_path)


@pytest.mark.parametrize("async_", [False, True])
def test_crash_mid_write_keeps_previous(tmp_path: Path, async_: bool) -> None:
    writer = CheckpointWriter(async_=async_)
    writer.save(tmp_path / "checkpoint-1", state_writer({"a": torch.ones(2)}))

    def crash(folder: Path) -> None:
        save_state({"a": torch.zeros(2)}, folder, "optimizer")
        raise RuntimeError("killed mid-write")

    with pytest.raises(CheckpointWriteError, match="killed mid-write"):  # sync: save raises; async: wait does
        writer.save(tmp_path / "checkpoint-2", crash)
        writer.wait()
    writer.wait()  # raised once, not again
    assert verify_checkpoint(tmp_path / "checkpoint-1") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    writer.close()


def test_async_error_reraised_on_next_save(tmp_path: Path) -> None:
    writer = CheckpointWriter(async_=True)

    def fail(folder: Path) -> None:
        raise OSError(28, "No space left on device")

    writer.save(tmp_path / "checkpoint-1", fail)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        writer.save(tmp_path / "checkpoint-2", state_writer({}))
    assert not (tmp_path / "checkpoint-2").exists()  # the new save did not start after the error
    writer.close()


def test_async_returns_before_write_and_matches_sync(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    release, started = threading.Event(), threading.Event()
    snap = snapshot_to_cpu({"model": model.state_dict(), "meta": {"step": (1, 2)}})
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    def slow_write(folder: Path) -> None:
        started.set()
        assert release.wait(10)
        save_state(snap, folder, "state")

    calls: list[str] = []
    writer = CheckpointWriter(async_=True)
    writer.save(tmp_path / "async" / "checkpoint-1", slow_write, after=lambda: calls.append("after"))
    assert started.wait(10) and writer.busy
    assert not (tmp_path / "async" / "checkpoint-1").exists() and calls == []
    with torch.no_grad():  # training goes on while the snapshot is written
        model.weight.add_(1.0)
    release.set()
    writer.wait()
    assert calls == ["after"] and not writer.busy

    CheckpointWriter(async_=False).save(
        tmp_path / "sync" / "checkpoint-1", lambda f: save_state(snap, f, "state")
    )
    a = load_state(tmp_path / "async" / "checkpoint-1", "state")
    b = load_state(tmp_path / "sync" / "checkpoint-1", "state")
    assert a["meta"] == b["meta"] == {"step": (1, 2)}
    for k in expected:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["model"][k], expected[k])
    for name in ("state.safetensors", "state.json"):
        assert (tmp_path / "async/checkpoint-1" / name).read_bytes() == (
            tmp_path / "sync/checkpoint-1" / name
        ).read_bytes()
    writer.close()


def test_one_save_in_flight(tmp_path: Path) -> None:
    order: list[str] = []
    gate = threading.Event()

    def first(folder: Path) -> None:
        gate.wait(10)
        order.append("first")

    with CheckpointWriter(async_=True) as writer:
        writer.save(tmp_path / "checkpoint-1", first)
        threading.Timer(0.05, gate.set).start()
        writer.save(tmp_path / "checkpoint-2", lambda f: order.append("second"))
    assert order == ["first", "second"]
    assert verify_checkpoint(tmp_path / "checkpoint-2") is None


def test_snapshot_to_cpu_is_a_deep_copy() -> None:
    t = torch.arange(3.0)
    src = {"a": t, "b": [t, (t, 1)], "c": "x"}
    snap = snapshot_to_cpu(src)
    t.add_(10)
    assert snap["a"].tolist() == [0.0, 1.0, 2.0] and snap["b"][1][0].tolist() == [0.0, 1.0, 2.0]
    assert isinstance(snap["b"][1], tuple) and snap["c"] == "x"


def test_staging_buffers_reuse_memory_and_copy_values() -> None:
    from ember.checkpoint.writer import StagingBuffers

    staging = StagingBuffers()
    live = {"w": torch.ones(3, 4), "step": torch.tensor(1.0), "meta": {"n": 2}}
    first = staging.snapshot(live)
    pointer = first["w"].data_ptr()
    live["w"].add_(1.0)  # training goes on: the snapshot must not move
    assert torch.equal(first["w"], torch.ones(3, 4))
    second = staging.snapshot(live)
    assert second["w"].data_ptr() == pointer  # same buffer, no new allocation
    assert torch.equal(second["w"], torch.full((3, 4), 2.0)) and second["meta"] == {"n": 2}
    live["w"] = torch.zeros(5)  # a new shape gets a fresh buffer
    assert staging.snapshot(live)["w"].shape == (5,)
