from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ember.checkpoint import save_state
from tests.pickle_check import assert_no_pickle, find_pickles


def test_flags_torch_save_by_content_and_name(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "model.safetensors")  # zip with data.pkl, innocent name
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.json", _use_new_zipfile_serialization=False)
    (tmp_path / "optimizer.pt").write_bytes(b"")
    found = find_pickles(tmp_path)
    assert set(found) == {"model.safetensors", "legacy.json", "optimizer.pt"}
    assert "data.pkl" in found["model.safetensors"] and "protocol" in found["legacy.json"]
    with pytest.raises(AssertionError, match="optimizer.pt"):
        assert_no_pickle(tmp_path)


def test_passes_safetensors_and_json(tmp_path: Path) -> None:
    save_state({"w": torch.ones(3), "step": 4}, tmp_path / "sub", "state")
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    assert_no_pickle(tmp_path)


def test_safetensors_header_starting_with_0x80_is_not_a_pickle(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    # Grow the metadata until the 8-byte header length reads 0x0280 = 640 bytes: b"\x80\x02...".
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(1)}, str(path), metadata={"p": ""})
    start = 640 - int.from_bytes(path.read_bytes()[:8], "little") - 8
    for pad in range(max(start, 0), start + 24):
        save_file({"w": torch.ones(1)}, str(tmp_path / "x.safetensors"), metadata={"p": "a" * pad})
        if (tmp_path / "x.safetensors").read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("could not produce a 640-byte header")
    assert_no_pickle(tmp_path)
