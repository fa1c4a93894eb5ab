"""The single-process strategy: the seam every backend fills, with nothing behind it here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import unwrap_model


def pick_device(use_cpu: bool) -> torch.device:
    """The device of a single-process run: CUDA, then MPS, then the CPU."""
    if not use_cpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not use_cpu and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class SingleDevice:
    """One process, one device. Collectives return their input; `no_sync` does nothing."""

    rank = 0
    local_rank = 0
    world_size = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @classmethod
    def from_args(cls, args: Any) -> SingleDevice:
        return cls(pick_device(bool(getattr(args, "use_cpu", False))))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    # -- model -----------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module) -> nn.Module:
        """Place (and, in subclasses, wrap) the model for training. Called once per train()."""
        from ..models.pipeline import place_model

        return place_model(model, self.device)

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
        from ..checkpoint.training import load_model_weights

        load_model_weights(self.unwrap(model), folder)

    # -- checkpoints ------------------------------------------------------------------------------
    def optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any] | None:
        """The optimizer state rank 0 saves; None when the strategy writes it itself (sharded)."""
        return optimizer.state_dict() if optimizer is not None else {}

    def load_model_and_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path
    ) -> None:
        """Restore model and optimizer from a checkpoint folder, whichever strategy wrote it: the
        full `model.safetensors` + `optimizer.*` of one process or DDP, or the sharded state of
        FSDP (read back into full tensors here, for any number of saving ranks)."""
        from ..checkpoint.state_io import load_state
        from ..checkpoint.training import OPTIMIZER, load_model_weights
        from .sharded import SHARDED_DIR, load_sharded

        if (folder / SHARDED_DIR).is_dir():
            load_sharded(model, optimizer, folder, process_group=None)
            return
        load_model_weights(self.unwrap(model), folder)
        if optimizer is not None and (folder / f"{OPTIMIZER}.json").exists():
            optimizer.load_state_dict(load_state(folder, OPTIMIZER, map_location=str(self.device)))

    def write_checkpoint(
        self, writer: Any, final_dir: Path, write_fn: Callable[[Path], None], after: Callable[[], None] | None
    ) -> None:
        """Write one checkpoint atomically. Multi-process strategies make every rank write into the
        same temporary folder and let rank 0 publish it once all are done."""
        writer.save(final_dir, write_fn, after)

    # -- collectives -----------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate `tensor` from every rank along dim 0 (padding done by the caller)."""
        return tensor

    def gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def any_rank(self, flag: bool) -> bool:
        """True if any rank says True: used to agree on stopping or saving."""
        return flag

    def barrier(self) -> None:
        pass

    def teardown(self) -> None:
        pass


Strategy = SingleDevice
