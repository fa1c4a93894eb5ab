from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ember.checkpoint import load_state, save_state
from tests.pickle_check import assert_no_pickle


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), f"{path} key {k!r}"
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def roundtrip(state: dict[str, Any], folder: Path, name: str = "s") -> dict[str, Any]:
    save_state(state, folder, name)
    assert_no_pickle(folder)
    out = load_state(folder, name)
    assert_same(state, out)
    return out


def _trained(opt_cls: type[torch.optim.Optimizer], **kw: Any) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    groups = [
        {"params": [model[0].weight, model[2].weight]},
        {"params": [model[0].bias, model[1].weight, model[1].bias, model[2].bias], "weight_decay": 0.0},
    ]
    opt = opt_cls(groups, **kw)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize(
    "opt_cls,kw",
    [
        (torch.optim.AdamW, {"lr": 1e-3}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.Adafactor, {"lr": 1e-2}),
    ],
)
def test_optimizer_state_roundtrip_and_reload(tmp_path: Path, opt_cls: type, kw: dict[str, Any]) -> None:
    opt = _trained(opt_cls, **kw)
    sd = opt.state_dict()
    out = roundtrip(sd, tmp_path)
    assert all(isinstance(k, int) for k in out["state"])
    fresh = _trained(opt_cls, **kw)
    fresh.load_state_dict(out)
    assert_same(fresh.state_dict(), sd)


def test_adam_step_is_zero_dim_tensor(tmp_path: Path) -> None:
    out = roundtrip(_trained(torch.optim.AdamW, lr=1e-3).state_dict(), tmp_path)
    step = out["state"][0]["step"]
    assert isinstance(step, torch.Tensor) and step.dim() == 0 and step.item() == 2


def test_scheduler_and_scaler_state(tmp_path: Path) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    opt.step()
    sched.step()
    scaler_state = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 3,
    }
    roundtrip({"scheduler": sched.state_dict(), "scaler": scaler_state}, tmp_path)


def test_every_value_kind(tmp_path: Path) -> None:
    state = {
        "dtypes": {
            str(dt): torch.arange(6).reshape(2, 3).to(dt)
            for dt in (
                torch.bool,
                torch.uint8,
                torch.int8,
                torch.int32,
                torch.int64,
                torch.float16,
                torch.bfloat16,
                torch.float32,
                torch.float64,
            )
        },
        "zero_dim": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "np": {
            "u4": np.arange(5, dtype=np.uint32),
            "f2": np.ones((2, 2), np.float16),
            "b": np.array([True]),
            "big_endian": np.arange(3, dtype=">i8"),
            "zero_dim": np.array(7, dtype=np.int16),
            "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        },
        "np_scalars": [np.float32(1.25), np.int64(-3), np.bool_(True), np.float64(0.1)],
        "floats": [0.1, -0.0, float("nan"), float("inf"), float("-inf"), 1e308],
        "ints": [0, -1, 2**70, True, False],
        "nested": {"tuple": (1, (2.5, None), [3, "x"]), "none": None, "str": 'é\n"', "bytes": b"\x00\xff"},
        "int_keys": {0: "a", 1: {2: [3]}, -5: None},
        "mixed_keys": {"a": 1, 2: "b", (1, "t"): 3, None: 4, 1.5: 5, False: 6},
        "tagged": {"__ember__": "tensor", "key": "not really"},
        "odict": OrderedDict([("b", 1), ("a", torch.ones(1))]),
        "dotted": {"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}},
        "empty_containers": [{}, [], ()],
    }
    out = roundtrip(state, tmp_path)
    assert out["np"]["big_endian"].dtype == np.dtype(">i8")
    assert math.copysign(1.0, out["floats"][1]) == -1.0
    doc = json.loads((tmp_path / "s.json").read_text())  # strict JSON: no NaN/Infinity literals
    assert "NaN" not in (tmp_path / "s.json").read_text() and doc["format"] == "ember-state"


def test_shared_storage_is_saved(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    state = {"a": base, "again": base, "view": base[2:5], "reshaped": base.view(2, 5)}
    out = roundtrip(state, tmp_path)
    assert out["view"].tolist() == [2.0, 3.0, 4.0]


def test_cuda_free_map_location_and_requires_grad(tmp_path: Path) -> None:
    p = nn.Parameter(torch.ones(2))
    save_state({"p": p}, tmp_path, "x")
    out = load_state(tmp_path, "x", map_location=torch.device("cpu"))
    assert type(out["p"]) is torch.Tensor and not out["p"].requires_grad


def test_empty_state_still_writes_files(tmp_path: Path) -> None:
    roundtrip({}, tmp_path, "callbacks")
    assert (tmp_path / "callbacks.safetensors").is_file() and (tmp_path / "callbacks.json").is_file()


@pytest.mark.parametrize(
    "state,where",
    [
        ({"cb": {"fn": lambda: 1}}, "['cb']['fn']"),
        ({"opt": {"state": {0: {"obj": object()}}}}, "['opt']['state'][0]['obj']"),
        ({"arr": np.array(["a"], dtype=object)}, "['arr']"),
        ({"k": {torch.ones(1): 1}}, "['k']"),
        ({"s": {1, 2}}, "['s']"),
    ],
)
def test_unstorable_values_name_the_path(tmp_path: Path, state: dict[str, Any], where: str) -> None:
    with pytest.raises(TypeError) as info:
        save_state(state, tmp_path, "bad")
    assert where in str(info.value) and "pickle" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_rejects_foreign_json(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"state": {}}))
    with pytest.raises(ValueError, match="not an ember state file"):
        load_state(tmp_path, "x")
