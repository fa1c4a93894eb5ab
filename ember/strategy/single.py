"""The single-process strategy: the seam every backend fills, with nothing behind it here."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..utils import unwrap_model
from .precision import Precision

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..checkpoint.io import CheckpointIO
    from ..checkpoint.parts import Parts
    from .rollback import RollbackParts, RollbackSnapshot

logger = logging.getLogger("ember")


def spans_devices(model: nn.Module) -> bool:
    """Whether transformers already placed `model` over several devices (`device_map=...`)."""
    device_map = getattr(model, "hf_device_map", None)
    return isinstance(device_map, dict) and len(set(device_map.values())) > 1


def placed_by_loader(model: nn.Module) -> bool:
    """Whether the model's loader placed it and `.to` must not move it: spread over several
    devices by transformers (`device_map=...`), or quantized by bitsandbytes (placed when loading;
    `.to` would re-quantize or refuse, and transformers' Trainer skips them too)."""
    if getattr(model, "quantization_method", None) == "bitsandbytes":  # a str enum in transformers
        return True
    return spans_devices(model)


class SingleDevice:
    """One process, one device (the `Strategy` of base.py). Collectives return their input;
    `no_sync` does nothing. A model that transformers spread over several devices stays where it
    is and trains as one process."""

    rank = 0
    local_rank = 0
    world_size = 1
    #: Whether each rank holds only a shard of the parameters (FSDP, ZeRO-3), so every rank must run
    #: every forward together (generation passes `synced_gpus=True`).
    shards_parameters = False

    def __init__(self, device: torch.device, precision: Precision | None = None) -> None:
        self.device = device
        self.precision = precision if precision is not None else Precision(device)

    @classmethod
    def from_args(cls, args: TrainingArguments, precision: Precision | None = None) -> SingleDevice:
        from .env import pick_device

        return cls(pick_device(args.use_cpu), precision)

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_world_size(self) -> int:
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    # -- model -----------------------------------------------------------------------------------
    def place_model(self, model: nn.Module) -> nn.Module:
        """Move the model to this process's device; one its loader placed is left as it is."""
        if placed_by_loader(model):
            return model
        return model.to(self.device)

    def setup_model(self, model: nn.Module) -> nn.Module:
        """Place (and, in subclasses, wrap) the model for training. Called once per train()."""
        return self.place_model(model)

    def setup_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Called once the optimizer exists (after `setup_model`): engines that own the optimizer
        (DeepSpeed) wrap both here; the others keep them as they are."""
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap_model(model)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Skip gradient synchronisation for micro-batches that are not the last of a step."""
        yield

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        loss.backward()

    def carry_reduced_gradients(self, model: nn.Module) -> None:
        """Nothing to do: no reduction here, and sharded ones (FSDP2, ZeRO) reduce only new gradients."""

    def split_sequences(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs

    def sum_sequence_parts(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    @property
    def grad_norm_before_step(self) -> bool:
        return True

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # foreach keeps this one fused kernel per dtype group instead of a launch per tensor;
        # clip_grad_norm_ itself skips parameters without a gradient.
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict of the user's module, for saving.

        Every rank calls it (gathering a sharded model is a collective); the result counts on the
        main process only.
        """
        return self.unwrap(model).state_dict()

    def load_model_weights(self, model: nn.Module, folder: Path) -> None:
        """Load the consolidated weights of a checkpoint (`model.safetensors`), e.g. the best one."""
        from ..checkpoint.io import CheckpointIO

        CheckpointIO.read_model(self.unwrap(model), folder)

    # -- checkpoints ------------------------------------------------------------------------------
    def optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any] | None:
        """The optimizer state rank 0 saves; None when the strategy writes it itself (sharded)."""
        return optimizer.state_dict() if optimizer is not None else {}

    def load_checkpoint(self, parts: Parts, io: CheckpointIO, folder: Path) -> None:
        """Restore model and optimizer from a checkpoint folder, whichever strategy wrote it: the
        full model + optimizer of one process or DDP, or the sharded state of FSDP (read back
        into full tensors here, for any number of saving ranks)."""
        model, optimizer = parts.model, parts.optimizer
        if io.has_sharded(folder):
            io.read_sharded(folder, model, optimizer, process_group=None)
            return
        io.read_model(self.unwrap(model), folder)
        if optimizer is not None:
            saved = io.read_optimizer(folder, map_location=str(self.device))
            if saved is not None:
                optimizer.load_state_dict(saved)

    def write_checkpoint(
        self,
        parts: Parts,
        io: CheckpointIO,
        final_dir: Path,
        write_fn: Callable[[Path], None],
        after: Callable[[], None] | None,
    ) -> None:
        """Write one checkpoint atomically. Multi-process strategies make every rank write into the
        same temporary folder and let rank 0 publish it once all are done."""
        io.save(final_dir, write_fn, after)

    def enter_checkpoint(self, step: int, peers: Any) -> None:
        pass  # one process: nobody to meet

    # -- rollback ---------------------------------------------------------------------------------
    def rollback_refusal(self) -> str | None:
        return None

    def snapshot_for_rollback(self, parts: RollbackParts) -> RollbackSnapshot:
        """The module's and the optimizer's own state dicts, cloned where they live. Under DDP the
        wrapper's keys (`module.`) come back through the same wrapper; under FSDP and tensor
        parallelism they are this rank's DTensor shards, so nothing is gathered."""
        from .rollback import clone_state, snapshot_rest

        assert parts.optimizer is not None, "a rollback copy is taken after an optimizer step"
        held = {
            "model": clone_state(parts.model.state_dict()),
            "optimizer": clone_state(parts.optimizer.state_dict()),
        }
        return snapshot_rest(parts, held)

    def restore_rollback(self, parts: RollbackParts, snapshot: RollbackSnapshot) -> None:
        from .rollback import clone_state, restore_rest

        parts.model.load_state_dict(clone_state(snapshot.held["model"]))
        parts.optimizer.load_state_dict(clone_state(snapshot.held["optimizer"]))
        restore_rest(parts, snapshot)

    # -- collectives -----------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of every rank, rank 0's first, on dim 0: on one process, `tensor` itself."""
        return tensor

    def gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def any_rank(self, flag: bool) -> bool:
        """True if any rank says True: used to agree on stopping or saving."""
        return flag

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass
