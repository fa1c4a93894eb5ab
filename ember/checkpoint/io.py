"""The one owner of the checkpoint layout: file names, the atomic folder, and when writes run.

Layout of `checkpoint-N/` (everything but the model is safetensors + JSON, never pickle)::

    config.json, model.safetensors[.index.json], tokenizer files   # as save_pretrained writes them
    (a PEFT model: adapter_model.safetensors + adapter_config.json instead, see model.py)
    trainer_state.json                                              # transformers' format
    training_args.json
    optimizer.{safetensors,json}       # a full optimizer.state_dict() (one process, DDP, ZeRO-0)
    trainer.{safetensors,json}     # scheduler, precision (grad scaler), data position, loss totals
    rank-<r>.{safetensors,json}    # per process: RNG states, its share of the running loss
    sharded/shard-*.safetensors    # DTensor state through torch.distributed.checkpoint (sharded.py)
    optimizer-groups.{safetensors,json}  # the param_groups that go with the sharded state
    deepspeed-rank-<r>.{safetensors,json}  # a ZeRO partition (fp32 master weights, moments)
    manifest.json                  # written last: sizes and hashes (xxh3_128) of every file above

Strategies and `training.py` read and write these parts only through a `CheckpointIO`, so no
other module spells a file name. A strategy receives the run's `Parts` and this object, and
decides what it holds (full tensors on rank 0, DTensor shards on every rank, an engine's
partition); this object decides where and how that lands on disk.

Sharded state is a DCP state dict (`ShardedState`): any module whose parameters are DTensors,
over any device mesh (FSDP's 1-D mesh, tensor parallel, both), is written by every rank as its own
shards and read back resharded, so a new way of placing parameters needs no new file kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Called through their modules, so a test that replaces one (a full disk, a failing rank) is obeyed.
from . import sharded, state_io
from .atomic import (
    MANIFEST_NAME,
    TMP_SUFFIX,
    CheckpointWriteError,
    abort_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
)
from .files import write_text
from .model import load_model_files, save_model_files
from .sharded import GROUPS_NAME, SHARDED_DIR, ShardedState
from .writer import CheckpointWriter, StagingBuffers, WriteFn

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
ARGS_NAME = "training_args.json"
OPTIMIZER = "optimizer"
TRAINER = "trainer"

__all__ = [
    "ARGS_NAME",
    "GROUPS_NAME",
    "OPTIMIZER",
    "SHARDED_DIR",
    "TRAINER",
    "TRAINER_STATE_NAME",
    "CheckpointIO",
    "ShardedState",
    "WriteFn",
    "is_model_file",
    "partition_name",
    "rank_name",
]


def rank_name(rank: int) -> str:
    """The per-process file of `rank` (RNG states, its share of the running loss)."""
    return f"rank-{rank}"


def partition_name(rank: int) -> str:
    """The file of `rank`'s engine partition (DeepSpeed ZeRO 1-3)."""
    return f"deepspeed-rank-{rank}"


# The top-level files of a checkpoint that only resuming reads (the run's state and the folder's own
# bookkeeping), as opposed to the model as users load it (weights, config, tokenizer files) and the
# arguments. Stems, so both halves of a safetensors + JSON pair match.
_RUN_STATE_STEMS = (OPTIMIZER, TRAINER, GROUPS_NAME)
_RUN_STATE_PREFIXES = ("rank-", "deepspeed-rank-")


def is_model_file(name: str) -> bool:
    """True for a top-level entry of a checkpoint that belongs to the trained model (what
    `save_model` writes, a PEFT adapter's folder included, plus training_args.json), False for
    resume-only state (optimizer, scheduler, RNG, shards) and the folder's bookkeeping."""
    stem = name.split(".", 1)[0]
    if name in (MANIFEST_NAME, TRAINER_STATE_NAME, SHARDED_DIR) or stem in _RUN_STATE_STEMS:
        return False
    return not stem.startswith(_RUN_STATE_PREFIXES)


class CheckpointIO:
    """Writes and reads the parts of a checkpoint folder; runs the writes now or in the background.

    One per run. `async_` (save_async) makes `save`/`run` return once the work is queued on one
    background thread; anything a background write touches must then be a CPU copy taken on the
    training thread (`staging` for full state, `detach_sharded` for DTensor shards).
    """

    def __init__(self, async_: bool = False, writer: CheckpointWriter | None = None) -> None:
        self.writer = writer if writer is not None else CheckpointWriter(async_=async_)

    @property
    def async_(self) -> bool:
        return self.writer.async_

    @property
    def staging(self) -> StagingBuffers:
        return self.writer.staging

    # -- when writes run ---------------------------------------------------------------------------
    def save(self, final_dir: Path, write_fn: WriteFn, after: Callable[[], None] | None = None) -> None:
        """One process: fill `<final_dir>.tmp/` with `write_fn`, publish it, then run `after`."""
        self.writer.save(final_dir, write_fn, after)

    def run(self, job: Callable[[], None]) -> None:
        """Run `job` (a whole multi-process protocol) now or on the writer thread."""
        self.writer.run(job)

    def wait(self) -> None:
        self.writer.wait()

    def settle(self) -> None:
        self.writer.settle()

    def close(self) -> None:
        self.writer.close()

    # -- the atomic folder, for writers on several processes -----------------------------------------
    @staticmethod
    def temp_folder(final_dir: Path) -> Path:
        return final_dir.with_name(final_dir.name + TMP_SUFFIX)

    @staticmethod
    def begin(final_dir: Path) -> Path:
        """Create a fresh temporary folder for `final_dir` and return it (the main process only)."""
        return begin_checkpoint(final_dir)

    @staticmethod
    def commit(tmp: Path, final_dir: Path) -> None:
        """Add the manifest to a filled `tmp` and rename it to `final_dir` (the main process only)."""
        commit_checkpoint(tmp, final_dir)

    @staticmethod
    def abort(
        tmp: Path | None, final_dir: Path, cause: BaseException, action: str = "writing"
    ) -> CheckpointWriteError:
        """Remove a half-written `tmp` (None: another process does); returns the error to raise."""
        return abort_checkpoint(tmp, final_dir, cause, action=action)

    # -- the model and the run's files --------------------------------------------------------------
    @staticmethod
    def write_model(
        folder: Path, model: nn.Module, processing_class: Any, state_dict: dict[str, torch.Tensor] | None
    ) -> None:
        save_model_files(model, folder, processing_class, state_dict=state_dict)

    @staticmethod
    def read_model(
        model: nn.Module, folder: Path, apply: Callable[[dict[str, torch.Tensor]], None] | None = None
    ) -> None:
        """Load the consolidated model of `folder` into `model` (or hand each file's tensors to `apply`)."""
        load_model_files(model, folder, apply=apply)

    @staticmethod
    def write_run_files(folder: Path, trainer_state_json: str, args_json: str) -> None:
        write_text(folder / TRAINER_STATE_NAME, trainer_state_json)
        write_text(folder / ARGS_NAME, args_json)

    @staticmethod
    def trainer_state_path(folder: Path) -> Path:
        return folder / TRAINER_STATE_NAME

    @staticmethod
    def args_path(folder: Path) -> Path:
        return folder / ARGS_NAME

    # -- named state (safetensors + JSON) ------------------------------------------------------------
    @staticmethod
    def write_optimizer(folder: Path, state: dict[str, Any]) -> None:
        state_io.save_state(state, folder, OPTIMIZER)

    @staticmethod
    def read_optimizer(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The full optimizer state of `folder`, None if it holds none (sharded, or model only)."""
        if not (folder / f"{OPTIMIZER}.json").exists():
            return None
        return state_io.load_state(folder, OPTIMIZER, map_location=map_location)

    @staticmethod
    def write_trainer(folder: Path, state: dict[str, Any]) -> None:
        state_io.save_state(state, folder, TRAINER)

    @staticmethod
    def has_trainer(folder: Path) -> bool:
        """False for a save_only_model checkpoint: no scheduler, data position, ..."""
        return (folder / f"{TRAINER}.json").exists()

    @staticmethod
    def read_trainer(folder: Path) -> dict[str, Any]:
        return state_io.load_state(folder, TRAINER)

    @staticmethod
    def write_rank(folder: Path, rank: int, state: dict[str, Any]) -> None:
        state_io.save_state(state, folder, rank_name(rank))

    @staticmethod
    def read_rank(folder: Path, rank: int) -> dict[str, Any] | None:
        """`rank`'s own state, None if the checkpoint was written by fewer processes."""
        if not (folder / f"{rank_name(rank)}.json").exists():
            return None
        return state_io.load_state(folder, rank_name(rank))

    @staticmethod
    def write_partition(folder: Path, rank: int, state: dict[str, Any]) -> None:
        state_io.save_state(state, folder, partition_name(rank))

    @staticmethod
    def read_partition(folder: Path, rank: int, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """`rank`'s engine partition; ValueError naming the file when there is none."""
        name = partition_name(rank)
        if not (folder / f"{name}.json").exists():
            raise ValueError(
                f"{folder} has no ZeRO partition for rank {rank} ({name}.json): it was written with "
                "another strategy or number of ranks; DeepSpeed checkpoints resume with the same world size."
            )
        return state_io.load_state(folder, name, map_location=map_location)

    # -- sharded (DTensor) state through torch.distributed.checkpoint --------------------------------
    def detach_sharded(self, state: ShardedState) -> ShardedState:
        """`state` as the write will see it: CPU copies of the shards when the write runs in the
        background (training keeps changing the live ones), the live shards otherwise."""
        if not self.async_:
            return state
        return ShardedState(sharded.copy_to_cpu(state.tensors), state.groups)

    @staticmethod
    def write_sharded(folder: Path, state: ShardedState, is_main: bool, process_group: Any) -> None:
        """Every rank writes its shards (a collective over `process_group`); the main process the groups."""
        sharded.save_sharded(state.tensors, state.groups, folder, is_main, process_group)

    @staticmethod
    def has_sharded(folder: Path) -> bool:
        return (folder / SHARDED_DIR).is_dir()

    @staticmethod
    def read_sharded(
        folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, process_group: Any
    ) -> None:
        """Fill `model` (and `optimizer`) from the sharded state, resharded to how they are placed
        now; `process_group=None` reads without a collective (one process)."""
        sharded.load_sharded(model, optimizer, folder, process_group=process_group)
