"""What every multi-process strategy shares: collectives, gathering for evaluation, and the
checkpoint protocol in which each rank writes its own files into one atomic folder.

Each collective turns a failed peer into `PeerFailure` with a message that says so, instead of a
bare socket error (or a hang: the process group has the ddp_timeout).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..engine.loss import IGNORE_INDEX
from .env import LaunchEnv, PeerFailure, collective, side_group
from .precision import Precision
from .single import SingleDevice

if TYPE_CHECKING:
    from ..checkpoint.io import CheckpointIO
    from ..checkpoint.parts import Parts

WriteStep = tuple[str, Callable[[Path], None]]

logger = logging.getLogger("ember")


class MultiProcess(SingleDevice):
    """Base of the strategies that run one process per device over a process group."""

    def __init__(
        self, env: LaunchEnv, device: torch.device, backend: str, precision: Precision | None = None
    ) -> None:
        super().__init__(device, precision)
        self.rank, self.local_rank, self.world_size = env.rank, env.local_rank, env.world_size
        self.backend = backend
        # Flags such as "was SIGTERM received" travel as CPU tensors where gloo can take them, so
        # asking costs no device synchronisation.
        self._flag_device = torch.device("cpu") if "gloo" in backend or device.type == "cpu" else device
        # Made here, on the training thread, while every rank builds its Trainer at the same point.
        self._checkpoint_group = side_group("checkpoint")

    # The group over which data-derived values (token counts, losses, eval rows) are summed or
    # gathered: every rank here; only the data-parallel ranks under tensor parallelism (mesh.py),
    # where the ranks of one TP group hold the same batch and must be counted once.
    _data_group: Any = None

    # -- collectives ------------------------------------------------------------------------------
    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        # A CPU tensor under a GPU-only backend (ddp_backend="nccl") makes the trip to the device.
        device = tensor.device
        movable = device.type == "cpu" and self._flag_device.type != "cpu"
        out = tensor.to(self.device) if movable else tensor.clone()
        with collective("all_reduce", self.rank):
            dist.all_reduce(out, op=op, group=self._data_group)
        return out.to(device) if movable else out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Equal-shaped `tensor` of every data-parallel rank, concatenated on dim 0."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.dp_world_size)]
        with collective("all_gather", self.rank):
            dist.all_gather(parts, tensor, group=self._data_group)
        return torch.cat([p.reshape(-1) if p.dim() == 0 else p for p in parts], dim=0)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of every data-parallel rank, rank 0's first, concatenated on dim 0.

        Ranks may differ in every dimension (the last batch is shorter, sequences have other
        lengths): dims >= 1 are padded with -100 to the longest on any rank and stay padded, as
        when single-process batches of several lengths are concatenated; dim 0 is cut back.
        """
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        shape = torch.tensor(tensor.shape, dtype=torch.int64, device=tensor.device)
        shapes = self._all_gather(shape.unsqueeze(0))
        longest = shapes.max(dim=0).values.tolist()
        padded = _pad_to_shape(tensor.contiguous(), longest)
        gathered = self._all_gather(padded).reshape(self.dp_world_size, *longest)
        rows = shapes[:, 0].tolist()
        return torch.cat([gathered[r, : rows[r]] for r in range(self.dp_world_size)], dim=0)

    def gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        with collective("all_gather_object", self.rank):
            dist.all_gather_object(out, obj)
        return out

    def any_rank(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._flag_device)
        with collective("agreeing on a flag (all_reduce max)", self.rank):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        with collective("broadcast_object", self.rank):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        with collective("barrier", self.rank):
            dist.barrier()

    def backward(self, loss: torch.Tensor, model: torch.nn.Module) -> None:
        with collective("the gradient reduction in backward", self.rank):
            loss.backward()

    # -- checkpoints --------------------------------------------------------------------------------
    def write_checkpoint(
        self,
        parts: Parts,
        io: CheckpointIO,
        final_dir: Path,
        write_fn: Callable[[Path], None],
        after: Callable[[], None] | None,
    ) -> None:
        """Rank 0 makes `<final>.tmp/`; every rank writes its files there; rank 0 adds the manifest
        and renames. After each phase the ranks agree (an all-reduce on a side group), so a failure
        on any rank stops every rank with `CheckpointWriteError` and leaves no partial folder."""
        # The strategy's own state is taken now, on the training thread: it must be this step's.
        steps = [("writing its files", write_fn), *self._extra_checkpoint_steps(parts, io)]
        io.run(lambda: self._checkpoint_protocol(io, Path(final_dir), steps, after))

    def enter_checkpoint(self, step: int, peers: Any) -> None:
        """The save's first meeting, before any collective that gathers state (FSDP's full model,
        DCP's plans, the folder agreement). Asynchronous and polled: a peer that raised while
        gathering its own state never arrives, and waiting in a plain collective here would last
        until its process exits or ddp_timeout passes; `peers.wait` stops this rank with the peer's
        own report instead, before the temporary folder exists. Runs on the checkpoint side group
        (an async save's protocol is over by now: `save_checkpoint` waited for it)."""
        flag = torch.zeros(1, dtype=torch.int32)
        with collective(f"entering the save of checkpoint-{step}", self.rank):
            work = dist.all_reduce(flag, group=self._checkpoint_group, async_op=True)
            failed = peers.wait(work)
        if failed is not None:
            raise PeerFailure(f"ember: rank {self.rank}: stopping because {failed}.")

    def _extra_checkpoint_steps(self, parts: Parts, io: CheckpointIO) -> list[WriteStep]:
        """Collective write phases after the per-rank files (sharded strategies add theirs)."""
        return []

    def _checkpoint_protocol(
        self, io: CheckpointIO, final_dir: Path, steps: list[WriteStep], after: Callable[[], None] | None
    ) -> None:
        tmp = io.temp_folder(final_dir)
        self._agree(io, final_dir, tmp, "creating the folder", lambda: io.begin(final_dir), main_only=True)
        for what, step in steps:
            self._agree(io, final_dir, tmp, what, lambda step=step: step(tmp))  # type: ignore[misc]
        self._agree(io, final_dir, tmp, "publishing", lambda: io.commit(tmp, final_dir), main_only=True)
        if after is not None:
            after()

    def _agree(
        self,
        io: CheckpointIO,
        final_dir: Path,
        tmp: Path,
        what: str,
        action: Callable[[], Any],
        main_only: bool = False,
    ) -> None:
        from ..checkpoint.atomic import CheckpointWriteError

        error: BaseException | None = None
        if self.is_main or not main_only:
            try:
                action()
            except Exception as exc:
                error = exc
        failed = torch.zeros(self.world_size, dtype=torch.int32)
        # A peer's failure reported through this rank (DCP tells every rank) is counted where it happened.
        failed[self.rank] = int(error is not None and not getattr(error, "peer_failure", False))
        with collective(f"agreeing on checkpoint {final_dir.name}", self.rank):
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self._checkpoint_group)
        if not bool(failed.any()) and error is None:
            return
        ranks = [r for r, bad in enumerate(failed.tolist()) if bad]
        cause = error or RuntimeError(f"on rank(s) {ranks}, see their log")
        if isinstance(error, CheckpointWriteError):
            if self.is_main:
                io.abort(tmp, final_dir, cause)
            raise error
        failure = io.abort(tmp if self.is_main else None, final_dir, cause, action=what)
        suffix = f" (rank {self.rank}; failed on rank(s) {ranks})" if error is not None else ""
        raise CheckpointWriteError(f"{failure}{suffix}") from error


def _pad_to_shape(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(tensor.shape) == shape:
        return tensor
    fill: Any = False if tensor.dtype == torch.bool else IGNORE_INDEX
    out = tensor.new_full(shape, fill)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out
