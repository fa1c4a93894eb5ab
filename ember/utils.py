"""Seeding, device moves and small helpers shared by the trainer and its parts."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    """The newest `checkpoint-N` folder in `folder`, or None.

    Only complete checkpoints count: a folder still being written (`checkpoint-N.tmp`) never
    matches, and when the checkpoint module is present a folder whose manifest fails is skipped.
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    for _, path in sorted(found, reverse=True):
        if _is_complete(path):
            return str(path)
    return None


def _is_complete(path: Path) -> bool:
    try:
        from .checkpoint import is_complete_checkpoint
    except ImportError:  # the checkpoint module is optional for this helper
        return True
    return is_complete_checkpoint(path)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP/FSDP/compile wrappers (they all keep it as `.module` or `._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
