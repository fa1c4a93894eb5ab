"""Sharded checkpoints through torch.distributed.checkpoint (DCP), without pickle.

DCP's default FileSystemWriter pickles its `.metadata` file and every non-tensor value. Here the
tensors (parameters and optimizer moments, as DTensors: each rank writes only its shards) go
through torch's `HuggingFaceStorageWriter` in distributed mode: one safetensors file per rank,
whose header records the offset of each shard in the full tensor. Reading rebuilds DCP's metadata
from those headers (`HuggingFaceStorageReader`), so a checkpoint saved on N ranks loads on any
number of ranks, or into one plain process without a process group. The few non-tensor values
(the optimizer's param_groups: lr, betas, ...) are identical on every rank; rank 0 writes them as
JSON beside the shards.

Layout inside `checkpoint-N/`::

    sharded/shard-0000R-model-00001-of-00001.safetensors   # one per saving rank
    optimizer-groups.json                                  # param_groups, FQN-keyed
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

SHARDED_DIR = "sharded"
GROUPS_NAME = "optimizer-groups"


class ShardedState(NamedTuple):
    """One rank's share of model and optimizer state: `tensors` (a DCP state dict of DTensors,
    {"model": ..., "optim": ...}, keyed by parameter names) and `groups` (the optimizer's
    param_groups, plain values equal on every rank)."""

    tensors: dict[str, Any]
    groups: dict[str, Any]


def split_tensors(state: Any) -> ShardedState:
    """(model + optimizer tensors for DCP, optimizer param_groups for JSON) from get_state_dict."""
    model_sd, optim_sd = state
    tensors: dict[str, Any] = {"model": model_sd}
    groups: dict[str, Any] = {"param_groups": []}
    if optim_sd:
        tensors["optim"] = optim_sd.get("state", {})
        groups["param_groups"] = optim_sd.get("param_groups", [])
    return ShardedState(tensors, groups)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> ShardedState:
    """This rank's share of model and optimizer state, keyed by parameter names (FQNs)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return split_tensors((get_model_state_dict(model), {}))
    return split_tensors(get_state_dict(model, optimizer))


def copy_to_cpu(tree: Any) -> Any:
    """A copy whose tensors (DTensor shards too) live on the CPU and no longer change with training."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        local = tree.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(
            local, tree.device_mesh, tree.placements, run_check=False, shape=tree.shape, stride=tree.stride()
        )
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: copy_to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [copy_to_cpu(v) for v in tree]
    return tree


def _unshare(tree: Any, seen: set[int]) -> Any:
    """Copy tensors whose memory an earlier one holds (tied weights such as lm_head = wte):
    safetensors stores each key on its own, and refuses shared memory."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, dict):
        return {k: _unshare(v, seen) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if isinstance(tree, DTensor) else tree
        if local.numel() == 0:
            return tree
        key = local.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            return tree
        return copy_to_cpu(tree)
    return tree


def save_sharded(
    tensors: dict[str, Any], groups: dict[str, Any], folder: Path, is_main: bool, process_group: Any
) -> None:
    """Write this rank's shards into `folder/sharded/` (collective over `process_group`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.api import CheckpointException

    from .state_io import save_state

    target = folder / SHARDED_DIR
    target.mkdir(exist_ok=True)
    writer = HuggingFaceStorageWriter(str(target), save_distributed=True)
    try:
        dcp.save(_unshare(tensors, set()), storage_writer=writer, process_group=process_group)
    except CheckpointException as exc:
        # A BaseException: left alone it would pass the checkpoint protocol's cleanup by.
        raise shard_write_error(exc, target) from None
    if is_main:
        save_state(groups, folder, GROUPS_NAME)


class PeerWriteError(OSError):
    """Another rank could not write its shards (this rank's own went through); carries that rank's
    error so every rank can say why the checkpoint failed."""

    peer_failure = True


def shard_write_error(exc: Any, target: Path) -> BaseException:
    """The error to raise on this rank for a failed DCP save (`CheckpointException`, which every
    rank receives with each failed rank's exception): this rank's own when it failed, else a
    `PeerWriteError` with the first failed rank's reason."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    failures: dict[int, Any] = dict(exc.failures)
    if rank in failures:
        own = failures[rank][0]
        if isinstance(own, OSError) and own.filename is None:
            own.filename = str(target)  # DCP's stream writes name no file
        return own if isinstance(own, Exception) else RuntimeError(f"{type(own).__name__}: {own}")
    first = min(failures)
    cause = failures[first][0]
    if isinstance(cause, OSError):
        return PeerWriteError(cause.errno, cause.strerror or str(cause), cause.filename or str(target))
    return PeerWriteError(None, f"rank {first}: {type(cause).__name__}: {cause}")


def load_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path, process_group: Any
) -> None:
    """Fill `model` (and `optimizer`) from `folder`'s sharded state, resharding as needed.

    Works for sharded (FSDP) and plain modules alike: the templates come from DCP's own
    `get_state_dict`, so each rank reads exactly the pieces of each tensor that it holds.
    `process_group=None` reads without any collective (one process, or every rank on its own).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from .state_io import load_state

    tensors, _ = sharded_state(model, optimizer)
    reader = HuggingFaceStorageReader(str(folder / SHARDED_DIR))
    if optimizer is None:
        tensors.pop("optim", None)
    _check_keys(tensors, reader, folder)
    with warnings.catch_warnings():
        # Without a group DCP warns that it assumes one process; reading alone is the intent here.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(tensors, storage_reader=reader, process_group=process_group, no_dist=process_group is None)
    optim_sd: dict[str, Any] = {}
    if optimizer is not None:
        groups = load_state(folder, GROUPS_NAME)["param_groups"]
        optim_sd = {"state": tensors.get("optim", {}), "param_groups": groups}
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=tensors["model"],
        optim_state_dict=optim_sd,
    )


def _check_keys(tensors: dict[str, Any], reader: Any, folder: Path) -> None:
    """Name the missing tensors before DCP does (its message lists no names)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    saved = set(reader.read_metadata().state_dict_metadata)
    wanted, _ = flatten_state_dict(tensors)
    missing = sorted(set(wanted) - saved)
    if missing:
        raise ValueError(
            f"The sharded checkpoint in {folder} lacks {len(missing)} tensors the model needs, e.g. "
            f"{missing[:3]}. Was it written for another model or optimizer?"
        )


def has_sharded_state(folder: Path) -> bool:
    return (folder / SHARDED_DIR).is_dir()
