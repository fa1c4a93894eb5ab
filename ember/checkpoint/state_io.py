"""Pickle-free storage of nested state dicts: tensors go to `<name>.safetensors`, the rest to `<name>.json`.

The JSON keeps the structure. Plain JSON values stand for themselves; everything JSON cannot say
exactly is a tagged object `{"__ember__": kind, ...}`:

    tensor    {"key": k}                       a tensor in the safetensors file
    ndarray   {"key": k, "dtype": "<u4"}       a numpy array, stored as a tensor
    npscalar  {"dtype": "float32", "value": v} a numpy scalar (np.float32(1.5), np.int64(3))
    tuple     {"items": [...]}
    float     {"value": "nan" | "inf" | "-inf"}
    bytes     {"hex": "..."}
    dict      {"items": [[key, value], ...]}  a dict with non-str keys (optimizer state uses int
                                               ids) or one that holds the key "__ember__"
    odict     {"items": [[key, value], ...]}  a collections.OrderedDict

Loading reads JSON and raw tensor bytes only; nothing in a checkpoint can run code. Other mapping
and sequence subclasses (defaultdict, namedtuple, str enums) are stored as their base type.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import (
    MAX_JSON_DEPTH,
    CheckpointError,
    depth_exceeds,
    read_json,
    resolve_inside,
    save_safetensors,
    write_text,
)

STATE_FORMAT = "ember-state"
STATE_VERSION = 1
_TAG = "__ember__"
_KEY_TYPES = (str, int, float, bool, type(None), tuple)


class _Encoder:
    """Nested state -> (JSON tree, {tensor key: tensor}); raises TypeError at the first bad value."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()

    def encode(self, obj: Any, path: str, key: str) -> Any:
        if isinstance(obj, np.generic):  # before float: np.float64 subclasses float
            return self._encode_npscalar(obj, path, key)
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {_TAG: "float", "value": repr(float(obj))}
        if isinstance(obj, torch.Tensor):
            return {_TAG: "tensor", "key": self._add_tensor(obj, key)}
        if isinstance(obj, np.ndarray):
            return self._encode_ndarray(obj, path, key)
        if isinstance(obj, (bytes, bytearray)):
            return {_TAG: "bytes", "hex": bytes(obj).hex()}
        if isinstance(obj, Mapping):
            return self._encode_mapping(obj, path, key)
        if isinstance(obj, tuple):
            return {_TAG: "tuple", "items": self._encode_items(obj, path, key)}
        if isinstance(obj, list):
            return self._encode_items(obj, path, key)
        raise self._error(path, obj)

    def _encode_items(self, items: list[Any] | tuple[Any, ...], path: str, key: str) -> list[Any]:
        return [self.encode(v, f"{path}[{i}]", f"{key}.{i}") for i, v in enumerate(items)]

    def _encode_mapping(self, obj: Mapping[Any, Any], path: str, key: str) -> Any:
        plain = type(obj) is not OrderedDict and all(type(k) is str for k in obj) and _TAG not in obj
        if plain:
            return {k: self.encode(v, f"{path}[{k!r}]", f"{key}.{k}") for k, v in obj.items()}
        pairs = []
        for k, v in obj.items():
            if not isinstance(k, _KEY_TYPES):
                raise TypeError(
                    f"Cannot save {self.name} state: a key of `{path or 'state'}` is a {type(k).__name__} "
                    f"({k!r}); only str, int, float, bool, None and tuples of those can be stored "
                    "without pickle."
                )
            pairs.append(
                [
                    self.encode(k, f"{path}<key>", f"{key}.<key>"),
                    self.encode(v, f"{path}[{k!r}]", f"{key}.{k}"),
                ]
            )
        return {_TAG: "odict" if isinstance(obj, OrderedDict) else "dict", "items": pairs}

    def _encode_ndarray(self, arr: np.ndarray, path: str, key: str) -> Any:
        if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
            raise TypeError(
                f"Cannot save {self.name} state: `{path}` is a numpy array of dtype {arr.dtype}; only "
                "bool, integer, float and complex arrays can be stored without pickle."
            )
        # A private native-endian C-order copy: torch needs both, and the caller may mutate `arr`.
        tensor = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), order="C", copy=True))
        return {_TAG: "ndarray", "key": self._add_tensor(tensor, key), "dtype": arr.dtype.str}

    def _encode_npscalar(self, obj: np.generic, path: str, key: str) -> Any:
        if obj.dtype.kind not in "biuf":
            raise self._error(path, obj)
        return {_TAG: "npscalar", "dtype": obj.dtype.str, "value": self.encode(obj.item(), path, key)}

    def _add_tensor(self, tensor: torch.Tensor, key: str) -> str:
        name = key.lstrip(".") or "tensor"
        base, n = name, 1
        while name in self.tensors:  # a key holding "." can collide with a nested path
            name, n = f"{base}#{n}", n + 1
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        # safetensors refuses tensors sharing memory; a private copy of later sharers keeps both values.
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and storage in self._storages:
            tensor = tensor.clone()
            storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel():
            self._storages.add(storage)
        self.tensors[name] = tensor
        return name

    def _error(self, path: str, obj: Any) -> TypeError:
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        return TypeError(
            f"Cannot save {self.name} state: `{path or 'state'}` is a {kind}, "
            "which cannot be stored without pickle. Store tensors, numpy arrays, numbers, strings, None, "
            "bytes, lists, tuples and dicts (convert it in state_dict())."
        )


def save_state(state: Mapping[str, Any], folder: str | os.PathLike[str], name: str) -> None:
    """Write `state` as `folder/name.safetensors` + `folder/name.json`; always both, even when empty.

    Nothing is written when some value cannot be stored: the TypeError names its key path.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"save_state({name!r}) needs a dict, got {type(state).__name__}.")
    encoder = _Encoder(name)
    tree = encoder.encode(state, "", "")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(encoder.tensors, folder / f"{name}.safetensors", metadata={"format": "pt"})
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "tensors": f"{name}.safetensors", "state": tree}
    if depth_exceeds(doc, MAX_JSON_DEPTH):
        # Refused now rather than at resume, where the reader bounds the depth it accepts.
        raise TypeError(
            f"Cannot save {name} state: it is nested more than {MAX_JSON_DEPTH - 8} levels deep, "
            "beyond what a checkpoint is read back with; flatten it in state_dict()."
        )
    write_text(folder / f"{name}.json", json.dumps(doc, allow_nan=False, separators=(",", ":")))


def load_state(
    folder: str | os.PathLike[str], name: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read what `save_state(state, folder, name)` wrote; tensors are placed on `map_location`.

    The files are untrusted: a damaged or crafted one raises `CheckpointError` (a ValueError for
    the format checks below) naming the file, and the tensor file must lie inside `folder`.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    json_path = folder / f"{name}.json"
    doc = read_json(json_path)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ValueError(f'{json_path} is not an ember state file (no "format": "{STATE_FORMAT}").')
    version = doc.get("version", 0)
    if not isinstance(version, int) or version > STATE_VERSION:
        raise ValueError(
            f"{json_path} has state format version {version!r}; this ember reads up to "
            f"{STATE_VERSION}. Upgrade ember to load it."
        )
    tensor_path = resolve_inside(folder, doc.get("tensors"), json_path, '"tensors"')
    tensors = load_file(str(tensor_path), device=str(map_location))
    try:
        state = _decode(doc.get("state"), tensors, json_path)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"{json_path} does not match {tensor_path.name} or is damaged ({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{json_path} does not hold a dict at the top level.")
    return state


def _decode(node: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, source) for v in node]
    if not isinstance(node, dict):
        return node
    kind = node.get(_TAG)
    if kind is None:
        return {k: _decode(v, tensors, source) for k, v in node.items()}
    if kind == "tensor":
        return tensors[node["key"]]
    if kind == "ndarray":
        return tensors[node["key"]].cpu().numpy().astype(np.dtype(node["dtype"]), copy=False)
    if kind == "npscalar":
        return np.dtype(node["dtype"]).type(_decode(node["value"], tensors, source))
    if kind == "tuple":
        return tuple(_decode(v, tensors, source) for v in node["items"])
    if kind == "float":
        return float(node["value"])
    if kind == "bytes":
        return bytes.fromhex(node["hex"])
    if kind in ("dict", "odict"):
        pairs = ((_decode(k, tensors, source), _decode(v, tensors, source)) for k, v in node["items"])
        return OrderedDict(pairs) if kind == "odict" else dict(pairs)
    raise ValueError(f"{source}: unknown value kind {kind!r}; it was written by a newer ember.")
