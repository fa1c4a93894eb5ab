"""The hashing safetensors writer: files that safetensors and transformers read back unchanged."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from ember.checkpoint.files import known_digest, save_safetensors, write_bytes


def test_hashing_writer_round_trips_every_dtype(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "f64": torch.randn(1, generator=g).double(),
        "i64": torch.arange(5),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u32": torch.tensor([1, 2**32 - 1], dtype=torch.uint32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
    }
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    assert known_digest(path) == xxhash.xxh3_128(path.read_bytes()).hexdigest()
    assert known_digest(path) is None  # consumed


def test_a_file_changed_after_writing_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(4)}, path)
    before = os.stat(path)
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")  # same size, same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1000))  # coarse clocks: make it differ
    assert known_digest(path) is None  # so write_manifest hashes the file itself


# Sizes around the 8 MiB staging buffer and the 4 KiB block: the small-file path, exact buffers,
# a padded and cut-back tail, several buffers in flight.
_SIZES = [0, 1, 4096, (8 << 20) - 1, 8 << 20, (8 << 20) + 1, (8 << 20) + 4096, (19 << 20) + 4321]


def _chunks(size: int, seed: int) -> tuple[bytes, list[bytes]]:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    raw = data.numpy().tobytes()
    cuts = [0, min(size, 7), min(size, 5000), min(size, (8 << 20) + 3), size]  # odd chunk borders
    return raw, [raw[a:b] for a, b in zip(cuts, cuts[1:])]


def test_large_files_written_past_the_page_cache_are_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    direct = getattr(os, "O_DIRECT", 0)
    opened: list[tuple[str, bool]] = []

    def watch(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append((Path(path).name, bool(flags & direct)))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watch)
    for i, size in enumerate(_SIZES):
        raw, chunks = _chunks(size, i)
        path = tmp_path / f"f{i}.bin"
        write_bytes(path, chunks)
        assert path.stat().st_size == size, size
        assert path.read_bytes() == raw, size
        assert known_digest(path) == xxhash.xxh3_128(raw).hexdigest(), size
    if direct:  # Linux: the files past one buffer went around the page cache, the others not
        assert {name for name, d in opened if d} == {
            f"f{i}.bin" for i, n in enumerate(_SIZES) if n >= 8 << 20
        }


def test_a_file_system_refusing_direct_io_gets_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a file system without O_DIRECT answers (EINVAL at open), for every open that asks for it.
    real_open = os.open
    refused = []

    def no_direct(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    raw, chunks = _chunks((8 << 20) + 12345, 7)
    write_bytes(tmp_path / "big.bin", chunks)
    assert (tmp_path / "big.bin").read_bytes() == raw
    assert known_digest(tmp_path / "big.bin") == xxhash.xxh3_128(raw).hexdigest()
    assert refused or not hasattr(os, "O_DIRECT")


def test_direct_io_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_CHECKPOINT_DIRECT_IO", "0")
    real_open = os.open
    flags_seen = []
    monkeypatch.setattr(os, "open", lambda p, f, *a, **k: flags_seen.append(f) or real_open(p, f, *a, **k))
    raw, chunks = _chunks(17 << 20, 3)
    write_bytes(tmp_path / "big.bin", chunks)
    assert (tmp_path / "big.bin").read_bytes() == raw
    assert not any(f & getattr(os, "O_DIRECT", 0) for f in flags_seen)


def test_a_failing_chunk_source_leaves_no_thread_or_buffer_behind(tmp_path: Path) -> None:
    def chunks() -> Any:
        yield bytes(20 << 20)
        raise RuntimeError("snapshot failed")

    with pytest.raises(RuntimeError, match="snapshot failed"):
        write_bytes(tmp_path / "x.bin", chunks())
    raw, more = _chunks(9 << 20, 1)  # the staging buffers are usable again
    write_bytes(tmp_path / "y.bin", more)
    assert (tmp_path / "y.bin").read_bytes() == raw
