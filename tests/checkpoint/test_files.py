"""The hashing safetensors writer: files that safetensors and transformers read back unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from ember.checkpoint.files import known_digest, save_safetensors


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
