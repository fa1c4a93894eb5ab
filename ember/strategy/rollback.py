"""In-memory rollback snapshots: what the loss-spike guard keeps, and how each part is copied.

The strategy decides how model and optimizer are copied (a module's state dict, DTensor shards,
an engine's partition); the rest (scheduler, precision, RNG) is the same for every strategy.
Copies stay where the state lives (on the device), so a rollback costs no host transfer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..checkpoint.parts import Stateful


@dataclass
class RollbackParts:
    """The parts a rollback copies and restores, by name: the model and optimizer as the strategy
    set them up (wrapped, sharded, or an engine and its stepping wrapper), the scheduler, the
    precision object (loss scaler) and the process's RNG."""

    model: nn.Module
    optimizer: Any
    scheduler: Stateful | None
    precision: Stateful
    rng: Stateful


@dataclass
class RollbackSnapshot:
    """One rank's copy of the parts a rollback restores. `held` is the strategy's own form of
    model and optimizer state (opaque to everyone else)."""

    held: Any
    scheduler: dict[str, Any] | None
    precision: dict[str, Any]
    rng: dict[str, Any]


def clone_state(obj: Any) -> Any:
    """A copy of a nested state whose tensors (DTensors too) no longer share memory with it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(clone_state(v) for v in obj)
    return copy.deepcopy(obj)


def snapshot_rest(parts: RollbackParts, held: Any) -> RollbackSnapshot:
    """`held` (the strategy's copy of model and optimizer) with copies of the other parts."""
    return RollbackSnapshot(
        held=held,
        scheduler=clone_state(parts.scheduler.state_dict()) if parts.scheduler is not None else None,
        precision=clone_state(parts.precision.state_dict()),
        rng=parts.rng.state_dict(),
    )


def restore_rest(parts: RollbackParts, snapshot: RollbackSnapshot) -> None:
    # Clones again: load_state_dict may keep the tensors it is given, and the snapshot must stay
    # intact for the next rollback to the same point.
    if snapshot.scheduler is not None and parts.scheduler is not None:
        parts.scheduler.load_state_dict(clone_state(snapshot.scheduler))
    parts.precision.load_state_dict(clone_state(snapshot.precision))
    parts.rng.load_state_dict(snapshot.rng)
