"""The launch environment and the one process group of this process.

torchrun (and Slurm/MPI launchers that export the same names) describes a process with
WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE. This module reads them, starts the process
group once per process, and ends it once at interpreter exit, because a script may build several
Trainers (hyperparameter search, evaluate-then-train) and they must share one group.

Ending a group: every rank waits at a barrier, then destroys it (without the barrier, a rank that
exits first sometimes makes another one abort inside teardown). A process that is exiting on an
error skips the barrier: its peers would wait for it until the timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

logger = logging.getLogger("ember")

DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits among its peers, as the launcher described it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer; fix the launcher"
        ) from None


def launch_env() -> LaunchEnv:
    """Read the launcher's variables; a plain `python train.py` is rank 0 of 1."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not fit (need 0 <= RANK < WORLD_SIZE)")
    return LaunchEnv(rank, local_rank, world, local_world)


#: The variables a relaunched job is recognised by: torchrun's elastic agent counts its restarts of
#: the worker group, Slurm counts requeues of the job; EMBER_AUTO_RESUME=1 says so by hand.
RESTART_VARIABLES = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def relaunch_reason() -> str | None:
    """Why this process counts as a relaunch of an earlier one ('TORCHELASTIC_RESTART_COUNT=1'),
    or None for a first launch."""
    for name in RESTART_VARIABLES:
        if _env_int(name, 0) > 0:
            return f"{name}={os.environ[name]}"
    if os.environ.get("EMBER_AUTO_RESUME", "").strip().lower() in ("1", "true", "yes", "on"):
        return "EMBER_AUTO_RESUME=" + os.environ["EMBER_AUTO_RESUME"]
    return None


def pick_device(use_cpu: bool, local_rank: int | None = None) -> torch.device:
    """This process's device, unless use_cpu: with a `local_rank` (one of several processes) GPU
    `local_rank`; alone, the current GPU, else MPS. The CPU when there is none of those."""
    if not use_cpu and torch.cuda.is_available():
        if local_rank is None:
            return torch.device("cuda", torch.cuda.current_device())
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    mps = getattr(torch.backends, "mps", None)
    if not use_cpu and local_rank is None and mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_backend(device: torch.device, requested: str | None) -> str:
    """nccl for GPUs (with gloo beside it for CPU tensors), gloo on CPU; `ddp_backend` wins."""
    if requested:
        return requested
    if device.type == "cuda":
        # CPU tensors (flags, checkpoint agreement) go through gloo without a device round-trip.
        return "cpu:gloo,cuda:nccl"
    return "gloo"


# -- the process group ----------------------------------------------------------------------------

_state: dict[str, Any] = {"owned": False, "failed": False, "timeout": DEFAULT_TIMEOUT_S, "groups": {}}


def init_process_group(env: LaunchEnv, backend: str, timeout_s: float) -> bool:
    """Start the default process group unless one exists; True if this call started it.

    A group the user started (before building the Trainer) is theirs: ember uses it and leaves its
    teardown to them.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise RuntimeError(
                f"a process group of {dist.get_world_size()} processes exists, but WORLD_SIZE is "
                f"{env.world_size}; start the script with the launcher that made the group"
            )
        return False
    _nccl_fail_fast()
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # One process (FSDP on a single device, tests): an in-memory store, no port to find.
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        kwargs.update(store=_attempt_store(timeout_s), rank=env.rank, world_size=env.world_size)
    dist.init_process_group(**kwargs)
    _state.update(owned=True, timeout=timeout_s)
    _install_exit_hooks()
    logger.info("ember: process group started (%s, rank %d of %d)", backend, env.rank, env.world_size)
    return True


def _attempt_store(timeout_s: float) -> Any:
    """The elastic agent's store, seen under a prefix of this restart attempt.

    torchrun keeps its store across `--max-restarts` restarts, so the process group of a restarted
    worker group would read the addresses its predecessors published (gloo then connects to a dead
    port, "Connection refused", and the restart fails whenever rank 0 is slower to start than the
    others). A prefix per attempt keeps each attempt's keys apart.
    """
    import torch.distributed as dist

    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"ember/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def _nccl_fail_fast() -> None:
    # Abort the communicators and the process when a collective times out or a peer fails, instead
    # of leaving the other ranks blocked on the GPU (torch's names; older releases read the second).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.setdefault("NCCL_ASYNC_ERROR_HANDLING", "1")


def timeout_s() -> float:
    return float(_state["timeout"])


def side_group(name: str) -> Any:
    """A gloo group over all ranks, for traffic that must not interleave with training collectives.

    Checkpoint agreement runs on its own group because an asynchronous save talks from the writer
    thread while the training thread keeps reducing gradients. Every rank must ask for a given
    name at the same point of its program the first time (creating a group is collective).
    """
    import torch.distributed as dist

    groups: dict[str, Any] = _state["groups"]
    if name not in groups:
        groups[name] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s()))
    return groups[name]


def mark_failed() -> None:
    """Remember that this process is going down on an error: skip the exit barrier."""
    _state["failed"] = True


def _install_exit_hooks() -> None:
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        mark_failed()
        previous(kind, value, tb)

    sys.excepthook = hook
    atexit.register(teardown_process_group)


def teardown_process_group() -> None:
    """Barrier, then destroy the group this module started. Runs at interpreter exit."""
    import torch.distributed as dist

    if not _state["owned"] or not dist.is_initialized():
        return
    _state["owned"] = False
    failing = _state["failed"] or sys.exc_info()[0] is not None
    if not failing:
        try:
            dist.barrier()
        except Exception as exc:  # a peer is gone: nothing left to synchronise with
            logger.warning("ember: barrier at exit failed (%s); tearing the process group down anyway", exc)
            failing = True
    if failing:
        # Destroying a group whose peers are gone can block; the process is ending anyway.
        return
    for group in _state["groups"].values():
        dist.destroy_process_group(group)
    _state["groups"] = {}
    dist.destroy_process_group()


# -- errors -------------------------------------------------------------------------------------------


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, raised, or did not arrive within ddp_timeout."""


def _dist_errors() -> tuple[type[BaseException], ...]:
    import torch.distributed as dist

    return (dist.DistError,)


def peer_failure_message(what: str, rank: int, exc: BaseException) -> str:
    from .peers import known_failure

    first_line = str(exc).splitlines()[0] if str(exc) else ""
    known = known_failure()
    if known is not None:
        # The low-level error ("Connection closed by peer") stays chained below; the cause is this.
        return f"ember: rank {rank}: stopping because {known}."
    return (
        f"ember: rank {rank}: {what} failed ({type(exc).__name__}: {first_line}). "
        "Another rank most likely died or raised an error (look at its log above), or did not reach "
        f"this point within ddp_timeout={timeout_s():g}s. Stopping this rank too."
    )


_PEER_GONE = ("Connection closed by peer", "Connection reset", "Timed out", "timed out")


def is_communication_error(exc: BaseException) -> bool:
    """A collective failed (a peer died, raised or hung), as opposed to an error of this rank."""
    if isinstance(exc, (PeerFailure, *_dist_errors())):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_GONE)


@contextlib.contextmanager
def collective(what: str, rank: int) -> Iterator[None]:
    """Turn a low-level communication error into `PeerFailure` that says what probably happened."""
    try:
        yield
    except _dist_errors() as exc:
        mark_failed()
        raise PeerFailure(peer_failure_message(what, rank, exc)) from exc
    except RuntimeError as exc:
        text = str(exc)
        if any(s in text for s in _PEER_GONE):
            mark_failed()
            raise PeerFailure(peer_failure_message(what, rank, exc)) from exc
        raise
