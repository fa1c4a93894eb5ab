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
