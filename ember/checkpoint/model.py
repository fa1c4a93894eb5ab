"""Writing the model the way users load it back: `save_pretrained` for transformers models,
`model.safetensors` (+ an index when sharded) for plain modules. Never pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import save_safetensors

WEIGHTS_NAME = "model.safetensors"


def save_model_files(
    model: nn.Module,
    folder: str | Path,
    processing_class: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write the model (and its tokenizer/processor) into `folder`, which is created if needed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(str(folder), state_dict=state_dict, max_shard_size=max_shard_size)
    else:
        save_plain_module(model, folder, state_dict)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(str(folder))


def save_plain_module(
    model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    tensors = _dedupe_shared(state_dict if state_dict is not None else model.state_dict())
    save_safetensors(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape))


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage; keep the first name of each storage."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out
