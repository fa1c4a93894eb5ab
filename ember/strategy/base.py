"""The interface every strategy implements: placement, precision, backward, state and collectives.

The trainer, the evaluation loop and the checkpoint code talk to a strategy only through this
Protocol, so none of them asks which backend runs. `SingleDevice` (single.py) is the one-process
implementation, where every collective is the identity; the multi-process strategies extend it.

Ranks: `rank`/`world_size` count processes; `dp_rank`/`dp_world_size` count data-parallel
replicas (who gets which batches, how large the global batch is). They are equal for DDP, FSDP
and DeepSpeed; tensor parallelism will make them differ, so code that shards data asks for the
data-parallel pair, and code that names files or elects a writer asks for the process pair.

Checkpoints: the strategy receives the run's `Parts` and the `CheckpointIO` and writes model and
optimizer state through it in whatever form it holds them (full on the main process, DTensor
shards on every rank, an engine's partition); the IO owns the file names and the atomic folder.
No strategy keeps a model or optimizer for a later save. Rollback snapshots (the loss-spike guard)
go through the strategy too: `snapshot_for_rollback` / `restore_rollback`, or
`rollback_refusal` says why it cannot, which the Trainer raises before any step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from ..checkpoint.io import CheckpointIO
    from ..checkpoint.parts import Parts
    from .precision import Precision
    from .rollback import RollbackParts, RollbackSnapshot


@runtime_checkable
class Strategy(Protocol):
    device: torch.device
    precision: Precision

    @property
    def rank(self) -> int: ...
    @property
    def local_rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def dp_rank(self) -> int: ...
    @property
    def dp_world_size(self) -> int: ...
    @property
    def is_main(self) -> bool: ...
    @property
    def is_local_main(self) -> bool: ...
    @property
    def shards_parameters(self) -> bool:
        """Whether each rank holds only a shard of the parameters (FSDP, ZeRO-3)."""

    # -- model -------------------------------------------------------------------------------------
    def place_model(self, model: nn.Module) -> nn.Module:
        """Put the model where this strategy runs it (device, shards), without training wrappers."""

    def setup_model(self, model: nn.Module) -> nn.Module:
        """Place and wrap the model for training (DDP, sharding). Called once per train()."""

    def setup_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Called once the optimizer exists: engines that own it (DeepSpeed) wrap both here."""

    def unwrap(self, model: nn.Module) -> nn.Module: ...

    def no_sync(self, model: nn.Module, sync: bool) -> AbstractContextManager[None]:
        """Skip gradient synchronisation for micro-batches that are not the last of a step."""

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None: ...

    def carry_reduced_gradients(self, model: nn.Module) -> None:
        """Before a backward whose gradients are reduced on top of gradients already reduced in this
        step (accelerator_config's sync_each_batch): leave them so that the next reduction adds only
        the new micro-batch's part once."""

    def split_sequences(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A training micro-batch (on the device) as this rank computes it: its part of every
        sequence under context parallelism (context.py), the batch itself otherwise."""

    def sum_sequence_parts(self, loss: torch.Tensor) -> torch.Tensor:
        """The step loss of the whole sequences from this rank's share (identity without context
        parallelism)."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor: ...

    @property
    def grad_norm_before_step(self) -> bool:
        """Whether the gradient norm exists before the optimizer steps (DeepSpeed ZeRO computes it
        inside its own step), so the step guard can test it."""

    # -- state -------------------------------------------------------------------------------------
    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full state dict for saving; every rank calls it, the main process's counts."""

    def load_model_weights(self, model: nn.Module, folder: Path) -> None: ...

    def optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any] | None:
        """What the main process saves; None when each rank writes its own share."""

    def load_checkpoint(self, parts: Parts, io: CheckpointIO, folder: Path) -> None:
        """Restore `parts.model` and `parts.optimizer` from `folder`, reading through `io`."""

    def write_checkpoint(
        self,
        parts: Parts,
        io: CheckpointIO,
        final_dir: Path,
        write_fn: Callable[[Path], None],
        after: Callable[[], None] | None,
    ) -> None:
        """Write `final_dir` atomically through `io`: `write_fn` fills in the run's files, the
        strategy adds the model/optimizer state it holds per rank, then `after` runs."""

    def enter_checkpoint(self, step: int, peers: Any) -> None:
        """Meet the other ranks before the first collective of the save of `step` (each has gathered
        its own state); a peer that failed before arriving stops this rank by name (`peers.wait`)."""

    # -- rollback (loss spikes) ----------------------------------------------------------------------
    def rollback_refusal(self) -> str | None:
        """Why this strategy cannot roll a step back in memory (None: it can)."""

    def snapshot_for_rollback(self, parts: RollbackParts) -> RollbackSnapshot:
        """An in-memory copy of model, optimizer, scheduler, precision and RNG, as this rank holds
        them (its own shards or partition: no gathering)."""

    def restore_rollback(self, parts: RollbackParts, snapshot: RollbackSnapshot) -> None:
        """Put the parts back to `snapshot` (every rank at once: some engines communicate)."""

    # -- collectives (the identity on one process) -------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of every data-parallel rank, rank 0's first, concatenated on dim 0."""

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order (a list of one on one process)."""

    def any_rank(self, flag: bool) -> bool: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank (a small picklable value, such as a message)."""

    def barrier(self) -> None: ...
