from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from ember.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    atomic_checkpoint,
    find_resumable_checkpoint,
    is_complete_checkpoint,
    load_checkpoint_dir,
    verify_checkpoint,
)
from ember.checkpoint import atomic as atomic_mod
from ember.utils import get_last_checkpoint


def write_ckpt(root: Path, step: int, payload: bytes = b"weights" * 100) -> Path:
    final = root / f"checkpoint-{step}"
    with atomic_checkpoint(final) as tmp:
        (tmp / "model.safetensors").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.json").write_text(json.dumps({"step": step}))
    return final


def test_writes_manifest_last_and_renames(tmp_path: Path) -> None:
    final = write_ckpt(tmp_path, 5)
    assert final.is_dir() and not (tmp_path / "checkpoint-5.tmp").exists()
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["format"] == "ember-checkpoint" and manifest["version"] == 2
    assert set(manifest["files"]) == {"model.safetensors", "sub/state.json"}
    assert manifest["files"]["model.safetensors"]["size"] == 700
    assert len(manifest["files"]["model.safetensors"]["xxh3_128"]) == 32
    assert verify_checkpoint(final) is None and is_complete_checkpoint(final)
    assert get_last_checkpoint(tmp_path) == str(final)


def test_body_exception_cleans_up_and_keeps_others(tmp_path: Path) -> None:
    good = write_ckpt(tmp_path, 1)
    with pytest.raises(CheckpointWriteError) as info, atomic_checkpoint(tmp_path / "checkpoint-2") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        raise ValueError("boom in write_fn")
    msg = str(info.value)
    assert "boom in write_fn" in msg and "checkpoint-2" in msg and "checkpoint-1" in msg
    assert isinstance(info.value.__cause__, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert verify_checkpoint(good) is None


def test_disk_full_while_writing_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_ckpt(tmp_path, 3)

    def full_disk(folder: Path) -> None:
        raise OSError(errno.ENOSPC, "disk is full", str(folder / "manifest.json"))

    monkeypatch.setattr(atomic_mod, "write_manifest", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        write_ckpt(tmp_path, 4)
    msg = str(info.value)
    assert "No space left on device" in msg and "manifest.json" in msg
    assert "intact" in msg and "checkpoint-3" in msg
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert verify_checkpoint(good) is None


def test_disk_full_inside_payload_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_mod.os, "fsync", failing_fsync)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        write_ckpt(tmp_path, 1)
    assert "no earlier complete checkpoint" in str(info.value)
    monkeypatch.setattr(atomic_mod.os, "fsync", real_fsync)
    assert list(tmp_path.iterdir()) == []


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    write_ckpt(tmp_path, 7, b"old")
    final = write_ckpt(tmp_path, 7, b"newer")
    assert (final / "model.safetensors").read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]
    assert verify_checkpoint(final) is None


def test_failed_rename_restores_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_ckpt(tmp_path, 7, b"old")
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if str(src).endswith("checkpoint-7.tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        real_replace(src, dst)

    monkeypatch.setattr(atomic_mod.os, "replace", replace)
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        write_ckpt(tmp_path, 7, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]
    assert (tmp_path / "checkpoint-7" / "model.safetensors").read_bytes() == b"old"


def test_stale_tmp_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "checkpoint-2.tmp"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"half")
    final = write_ckpt(tmp_path, 2)
    assert not (final / "junk.bin").exists() and not stale.exists()


def test_verify_reasons(tmp_path: Path) -> None:
    final = write_ckpt(tmp_path, 1)
    (final / "extra.txt").write_text("files not in the manifest are ignored")
    assert verify_checkpoint(final) is None
    data = final / "model.safetensors"
    data.write_bytes(b"X" + data.read_bytes()[1:])  # same size, different bytes
    assert verify_checkpoint(final, deep=False) is None
    assert "model.safetensors" in verify_checkpoint(final) and "hash mismatch" in verify_checkpoint(final)
    with open(data, "r+b") as fh:
        fh.truncate(123)
    assert verify_checkpoint(final, deep=False) == "model.safetensors: size 123 != 700 (truncated)"
    data.unlink()
    assert verify_checkpoint(final) == "model.safetensors: missing file"
    (final / "manifest.json").unlink()
    assert verify_checkpoint(final) == "no manifest.json (incomplete write)"
    assert verify_checkpoint(tmp_path / "nope") == "does not exist"
    (final / "manifest.json").write_text("{not json")
    assert "manifest.json is not valid JSON" in verify_checkpoint(final)


def test_manifest_cannot_point_outside(tmp_path: Path) -> None:
    final = write_ckpt(tmp_path, 1)
    (tmp_path / "secret").write_text("x")
    manifest = {"format": "ember-checkpoint", "version": 1, "files": {"../secret": {"size": 1, "sha256": ""}}}
    (final / "manifest.json").write_text(json.dumps(manifest))
    assert "outside the checkpoint" in verify_checkpoint(final)


def test_find_resumable_skips_truncated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in (5, 10, 100):
        write_ckpt(tmp_path, step)
    (tmp_path / "checkpoint-200.tmp").mkdir()  # a write that never finished
    incomplete = tmp_path / "checkpoint-150"
    incomplete.mkdir()  # e.g. a non-atomic writer died here
    with open(tmp_path / "checkpoint-100" / "model.safetensors", "r+b") as fh:
        fh.truncate(10)
    with caplog.at_level(logging.WARNING, logger="ember.checkpoint.atomic"):
        found = find_resumable_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-10"  # numeric order: 10 > 5 although "10" < "5"
    text = caplog.text
    assert "checkpoint-100" in text and "model.safetensors: size 10 != 700 (truncated)" in text
    assert "checkpoint-150" in text and "no manifest.json" in text
    assert get_last_checkpoint(tmp_path) == str(found)
    assert find_resumable_checkpoint(tmp_path / "missing") is None


def test_load_checkpoint_dir(tmp_path: Path) -> None:
    good = write_ckpt(tmp_path, 1)
    bad = write_ckpt(tmp_path, 2)
    assert load_checkpoint_dir(good) == good
    data = bad / "model.safetensors"
    data.write_bytes(data.read_bytes()[::-1])
    # Same size, other bytes: only the (opt-in) deep check sees it.
    assert load_checkpoint_dir(bad) == bad
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_dir(bad, deep=True)
    msg = str(info.value)
    assert "checkpoint-2" in msg and "hash mismatch" in msg and "checkpoint-1" in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_dir(tmp_path / "checkpoint-9")
    data.write_bytes(data.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint_dir(bad)
