"""`assert_no_pickle(folder)`: fail if anything under `folder` is (or is named like) a pickle."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")


def _is_safetensors(head: bytes, size: int) -> bool:
    # An 8-byte little-endian header length followed by a JSON header: its first byte can be 0x80,
    # which would otherwise look like a pickle protocol marker.
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 8 + header_len <= size and head[8:9] == b"{"


def pickle_reason(path: str | os.PathLike[str]) -> str | None:
    """Why `path` looks like a pickle, or None."""
    path = Path(path)
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return f"name ends with {path.suffix}"
    with open(path, "rb") as fh:
        head = fh.read(16)
    if (
        len(head) >= 2
        and head[0] == 0x80
        and 2 <= head[1] <= 5
        and not _is_safetensors(head, path.stat().st_size)
    ):
        return f"starts with pickle protocol {head[1]} marker"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            pickled = [n for n in zf.namelist() if n.endswith(".pkl")]
        if pickled:
            return f"zip archive (torch.save format) holding {pickled[0]}"
    return None


def find_pickles(folder: str | os.PathLike[str]) -> dict[str, str]:
    """{relative path: reason} for every file under `folder` that looks like a pickle."""
    root = Path(folder)
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        reason = pickle_reason(path)
        if reason:
            found[path.relative_to(root).as_posix()] = reason
    return found


def assert_no_pickle(folder: str | os.PathLike[str]) -> None:
    found = find_pickles(folder)
    assert not found, f"pickle files under {folder}: " + "; ".join(f"{k} ({v})" for k, v in found.items())
