"""DistributedDataParallel: a full copy of the model per process, gradients summed across ranks.

Exact losses: each rank's loss is (sum of its target losses) / (target count of the whole step on
all ranks), so the gradient of one big batch is the *sum* of the ranks' gradients. DDP's own
reduction averages (it divides by the world size); a communication hook that only sums replaces
it, so no loss rescaling and no rounding from it, for any number of ranks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .env import LaunchEnv
from .multi import MultiProcess

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from .precision import Precision


def sum_gradients_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: all-reduce (sum) a bucket without dividing by the world size.

    Unannotated on purpose: DDP checks the annotations as objects, and this module's are strings.
    """
    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()  # type: ignore[union-attr]
    return future.then(lambda fut: fut.value()[0])


class DDPStrategy(MultiProcess):
    """One process per device; `torch.nn.parallel.DistributedDataParallel` around the model."""

    def __init__(
        self,
        env: LaunchEnv,
        device: torch.device,
        backend: str,
        precision: Precision | None = None,
        find_unused_parameters: bool | None = None,
        bucket_cap_mb: int | None = None,
        broadcast_buffers: bool | None = None,
        static_graph: bool | None = None,
    ) -> None:
        super().__init__(env, device, backend, precision)
        self.static_graph = bool(static_graph)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.bucket_cap_mb = bucket_cap_mb
        self.broadcast_buffers = broadcast_buffers

    @classmethod
    def build(
        cls, args: TrainingArguments, env: LaunchEnv, device: torch.device, backend: str, precision: Precision
    ) -> DDPStrategy:
        return cls(
            env,
            device,
            backend,
            precision,
            find_unused_parameters=args.ddp_find_unused_parameters,
            bucket_cap_mb=args.ddp_bucket_cap_mb,
            broadcast_buffers=args.ddp_broadcast_buffers,
            static_graph=args.ddp_static_graph,
        )

    def setup_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        module = self.place_model(self.unwrap(model))
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError("DDP needs a model with trainable parameters; none requires grad.")
        kwargs: dict[str, Any] = {"find_unused_parameters": self.find_unused_parameters}
        if self.static_graph:
            kwargs["static_graph"] = True
        if self.bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = self.bucket_cap_mb
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
        with warnings.catch_warnings():
            # torch 2.13 renames broadcast_buffers; the old name keeps transformers' meaning (also at init).
            warnings.simplefilter("ignore", FutureWarning)
            if self.broadcast_buffers is not None:
                kwargs["broadcast_buffers"] = self.broadcast_buffers
            wrapped = DistributedDataParallel(module, **kwargs)
        wrapped.register_comm_hook(None, sum_gradients_hook)
        return wrapped

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if sync or not hasattr(model, "no_sync"):
            yield
            return
        with model.no_sync():  # type: ignore[operator]
            yield

    def carry_reduced_gradients(self, model: nn.Module) -> None:
        """DDP reduces the whole accumulated `.grad`, and the hook sums: a sum already reduced (the same
        on every rank) would come back world-size times. Divided by the world size first, the next
        sum restores it once (exactly, for a power-of-two world size) and adds the new part."""
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(self.dp_world_size)

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        try:
            super().backward(loss, model)
        except RuntimeError as exc:
            if "find_unused_parameters" in str(exc) or "did not receive grad" in str(exc):
                raise RuntimeError(
                    "Some parameters got no gradient in this step, which DDP cannot reduce by default. "
                    "Set `ddp_find_unused_parameters=True` (a little slower), or make every parameter "
                    "take part in the loss."
                ) from exc
            raise
