"""Checkpoints: the model as users load it, plus trainer state as safetensors + JSON."""

from __future__ import annotations

from .atomic import (
    CheckpointError,
    CheckpointWriteError,
    atomic_checkpoint,
    find_resumable_checkpoint,
    is_complete_checkpoint,
    load_checkpoint_dir,
    verify_checkpoint,
)
from .lock import OutputDirLockedError
from .model import save_model_files
from .rng import capture_rng_state, restore_rng_state
from .rotation import remove_stale_tmp, rotate_checkpoints, sorted_checkpoints
from .state_io import load_state, save_state
from .writer import CheckpointWriter, snapshot_to_cpu

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointWriter",
    "OutputDirLockedError",
    "atomic_checkpoint",
    "capture_rng_state",
    "find_resumable_checkpoint",
    "is_complete_checkpoint",
    "load_checkpoint_dir",
    "load_state",
    "remove_stale_tmp",
    "restore_rng_state",
    "rotate_checkpoints",
    "save_model_files",
    "save_state",
    "snapshot_to_cpu",
    "sorted_checkpoints",
    "verify_checkpoint",
]
