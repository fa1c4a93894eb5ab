"""Seeding, device moves and small helpers shared by the trainer and its parts."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); with `deterministic`, also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        enable_full_determinism(seed)


def enable_full_determinism(seed: int) -> None:
    """Deterministic algorithms everywhere; slower, but two runs give the same bits on GPU too."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    # cuBLAS needs a fixed workspace to be deterministic; must be set before the first cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a (nested) batch to `device`; other values pass through unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device, non_blocking) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def get_last_checkpoint(folder: str | os.PathLike[str]) -> str | None:
    """The newest complete `checkpoint-N` folder in `folder`, or None.

    The same choice as `resume_from_checkpoint=True`: folders still being written or whose
    manifest does not check out are skipped (with a warning naming them).
    """
    from .checkpoint import find_resumable_checkpoint

    found = find_resumable_checkpoint(folder)
    return str(found) if found is not None else None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP/FSDP/compile wrappers (they all keep it as `.module` or `._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def base_model(model: Any) -> Any:
    """The model whose `forward` defines the inputs: strips DDP/FSDP-like `.module`,
    `torch.compile`'s `_orig_mod` and PEFT-like `get_base_model()` wrappers.

    Unlike `unwrap_model` this also looks through PEFT, so it is for reading the architecture
    (signature, causal shift), not for saving.
    """
    for _ in range(16):
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif getattr(model, "_orig_mod", None) is not None:
            model = model._orig_mod
        elif getattr(model, "module", None) is not None and hasattr(model.module, "forward"):
            model = model.module
        else:
            break
    return model


def batch_rows(batch: Any) -> int | None:
    """Examples in a batch: the first dimension of its first tensor that has one, or the length of
    its first list; None when it has neither (a dict of scalars)."""
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    return None


def count_parameters(model: Any, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
    """Parameters of `model` (only those that train, with `trainable_only`). `exclude_embeddings` asks a
    transformers model for its non-embedding count (`num_parameters(exclude_embeddings=True)`, what a
    token's FLOPs scale with); a plain module has no such notion and counts all of them."""
    count = getattr(model, "num_parameters", None)
    if exclude_embeddings and callable(count):
        try:
            return int(count(only_trainable=trainable_only, exclude_embeddings=True))
        except TypeError:
            pass
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
