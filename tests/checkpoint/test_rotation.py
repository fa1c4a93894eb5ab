from __future__ import annotations

from pathlib import Path

import pytest

from ember.checkpoint import atomic_checkpoint, remove_stale_tmp, rotate_checkpoints, sorted_checkpoints


def make(root: Path, *steps: int) -> None:
    for step in steps:
        with atomic_checkpoint(root / f"checkpoint-{step}") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w" * step)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_sorted_checkpoints_is_numeric(tmp_path: Path) -> None:
    make(tmp_path, 100, 9, 20)
    (tmp_path / "checkpoint-3.tmp").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-4").write_text("a file, not a folder")
    assert [p.name for p in sorted_checkpoints(tmp_path)] == [
        "checkpoint-9",
        "checkpoint-20",
        "checkpoint-100",
    ]


@pytest.mark.parametrize(
    "limit,keep,left",
    [
        (2, (), [3, 4]),
        (1, (), [4]),
        (1, (2,), [2, 4]),  # best older than newest: both survive
        (1, (4,), [4]),
        # As transformers: the best and the newest count against the limit.
        (2, (1,), [1, 4]),
        (3, (1,), [1, 3, 4]),
        (2, (4,), [3, 4]),
        (None, (), [1, 2, 3, 4]),
        (0, (), [1, 2, 3, 4]),
        (10, (), [1, 2, 3, 4]),
    ],
)
def test_rotation_limits(tmp_path: Path, limit: int | None, keep: tuple[int, ...], left: list[int]) -> None:
    make(tmp_path, 1, 2, 3, 4)
    rotate_checkpoints(tmp_path, limit, keep={tmp_path / f"checkpoint-{k}" for k in keep})
    assert names(tmp_path) == sorted(f"checkpoint-{s}" for s in left)


def test_rotation_skips_incomplete_and_removes_stale_tmp(tmp_path: Path) -> None:
    make(tmp_path, 1, 2, 3)
    (tmp_path / "checkpoint-0").mkdir()  # no manifest: never counted, never deleted
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-2.replaced.tmp").mkdir()
    (tmp_path / "notes.tmp").mkdir()  # not ours
    deleted = rotate_checkpoints(tmp_path, 1, keep={str(tmp_path / "checkpoint-1")})
    assert deleted == [tmp_path / "checkpoint-2"]
    assert names(tmp_path) == ["checkpoint-0", "checkpoint-1", "checkpoint-3", "notes.tmp"]


def test_remove_stale_tmp_on_missing_dir(tmp_path: Path) -> None:
    assert remove_stale_tmp(tmp_path / "nope") == []
    assert rotate_checkpoints(tmp_path / "nope", 1) == []


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs."""


def test_a_kill_between_rename_and_removal_leaves_no_torn_checkpoint(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    from ember.checkpoint import find_resumable_checkpoint, rotation

    make(tmp_path, 1, 2, 3)

    def killed(path: Path) -> None:
        raise Killed

    monkeypatch.setattr(rotation, "fsync_dir", killed)  # runs right after the rename, before removal
    with pytest.raises(Killed):
        rotate_checkpoints(tmp_path, 1)
    assert names(tmp_path) == ["checkpoint-1.deleting.tmp", "checkpoint-2", "checkpoint-3"]
    # Nothing treats the renamed folder as a checkpoint.
    assert [p.name for p in sorted_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    monkeypatch.undo()
    # Half removed already (a kill during the removal itself): cleaned just the same.
    (tmp_path / "checkpoint-1.deleting.tmp" / "model.safetensors").unlink()
    assert find_resumable_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    with caplog.at_level("INFO"):
        removed = rotation.recover_output_dir(tmp_path)
    assert removed == [tmp_path / "checkpoint-1.deleting.tmp"]
    assert "checkpoint-1.deleting.tmp, left by an interrupted delete" in caplog.text
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3"]


def test_a_half_deleted_checkpoint_of_an_old_version_is_reported_and_never_resumed(
    tmp_path: Path, caplog
) -> None:
    from ember.checkpoint import find_resumable_checkpoint
    from ember.checkpoint.rotation import recover_output_dir

    make(tmp_path, 1, 2)
    (tmp_path / "checkpoint-3").mkdir()  # an old rmtree killed after it removed the manifest
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"w" * 3)
    make(tmp_path, 4)
    (tmp_path / "checkpoint-4" / "model.safetensors").unlink()  # killed before reaching the manifest
    with caplog.at_level("WARNING"):
        assert find_resumable_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
        caplog.clear()
        recover_output_dir(tmp_path)
    assert "checkpoint-3 is not a complete checkpoint (no manifest.json" in caplog.text
    assert "checkpoint-4 is not a complete checkpoint (model.safetensors: missing file)" in caplog.text
    assert "never resumed from" in caplog.text
    assert rotate_checkpoints(tmp_path, 1) == [tmp_path / "checkpoint-1"]  # never counted or deleted
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
