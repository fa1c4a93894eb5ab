"""The stateful parts of a run, by name: what checkpoints and rollback snapshots are made of.

Its own module, importing nothing of `strategy/` or `engine/` at run time, so that the strategy
(which saves, loads and rolls back the parts) and the checkpoint code (which arranges them into
files) can both name it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ..engine.run_position import RunProgress


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Parts:
    """The stateful parts of a run, by name. `model` and `optimizer` go through the strategy (they
    may be wrapped, sharded or owned by an engine: under DeepSpeed `model` is the engine and
    `optimizer` its stepping wrapper); `scheduler` and `sampler` may be None; `callbacks` is stored
    in trainer_state.json (`stateful_callbacks`), `rng` and the unlogged loss per rank."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Stateful | None
    precision: Stateful
    progress: RunProgress
    sampler: Stateful | None
    callbacks: Stateful
    rng: Stateful
    batch_split: Stateful | None = None  # auto_find_batch_size's micro-batch split
    guard: Stateful | None = None  # the step guard (engine/guards.py)
