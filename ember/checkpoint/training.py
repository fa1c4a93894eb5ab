"""What a training checkpoint holds, and how a run's stateful parts go in and come back out.

Every part is a `state_dict()`; this module only gathers those dicts and hands them to the
`CheckpointIO` (io.py), which owns the file layout. It receives the parts by name (`Parts`, in
parts.py) with the strategy, which saves and loads model and optimizer however they are placed,
and knows nothing of the object that runs the loop. A snapshot is taken on the training thread
(copied to CPU when the write runs in the background), and the write touches only the snapshot,
so training may go on while it runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..callbacks.state import TrainerState
from .atomic import find_resumable_checkpoint, load_checkpoint_dir
from .files import CheckpointError, read_json, relocate_in_run
from .io import ARGS_NAME, OPTIMIZER, TRAINER, TRAINER_STATE_NAME, CheckpointIO, rank_name
from .model import load_model_files
from .parts import Parts, Stateful
from .rotation import rotate_checkpoints

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..strategy.base import Strategy

logger = logging.getLogger(__name__)

# Names scripts imported from here before the layout moved to io.py.
__all__ = [
    "ARGS_NAME",
    "OPTIMIZER",
    "TRAINER",
    "TRAINER_STATE_NAME",
    "Parts",
    "Snapshot",
    "Stateful",
    "rank_name",
]


@dataclass
class Snapshot:
    """Everything one process writes for one checkpoint, detached from the live objects."""

    rank: int
    is_main: bool
    model: Any
    model_state: dict[str, torch.Tensor] | None
    processing_class: Any
    optimizer: dict[str, Any] | None
    trainer: dict[str, Any] | None
    rank_state: dict[str, Any] | None
    trainer_state_json: str
    args_json: str
    io: CheckpointIO


def take_snapshot(
    parts: Parts,
    strategy: Strategy,
    args: TrainingArguments,
    state: TrainerState,
    processing_class: Any = None,
    staging: Any = None,
    io: CheckpointIO | None = None,
) -> Snapshot:
    """Gather the state dicts of every part; with `staging` (a `StagingBuffers`), on CPU and
    independent of training. `io` writes it (a foreground one when None)."""
    only_model = args.save_only_model
    # Every rank asks (gathering a sharded model is a collective); only the main process keeps it.
    full_model = strategy.model_state_dict(parts.model)
    model_state = full_model if strategy.is_main else None
    optimizer = (
        None
        if only_model or not strategy.is_main
        else strategy.optimizer_state_dict(parts.model, parts.optimizer)
    )
    shared = None
    if not only_model and strategy.is_main:
        shared = {
            "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else {},
            "precision": parts.precision.state_dict(),
            "sampler": parts.sampler.state_dict() if parts.sampler is not None else {},
            **parts.progress.state_dict(),
            **({"guard": parts.guard.state_dict()} if parts.guard is not None else {}),
            "world_size": strategy.world_size,
            **({"batch_split": parts.batch_split.state_dict()} if parts.batch_split is not None else {}),
        }
    rank_state = None
    if not only_model:
        rank_state = {"rng": parts.rng.state_dict(), **parts.progress.local_state_dict()}
    if staging is not None:
        # The previous snapshot's buffers are reused, so its write must be over (save_checkpoint
        # waits for it before calling this).
        model_state, optimizer, shared, rank_state = staging.snapshot(
            (model_state, optimizer, shared, rank_state)
        )
    return Snapshot(
        rank=strategy.rank,
        is_main=strategy.is_main,
        model=strategy.unwrap(parts.model),
        model_state=model_state,
        processing_class=processing_class,
        optimizer=optimizer,
        trainer=shared,
        rank_state=rank_state,
        trainer_state_json=state.to_json_string(),
        args_json=json.dumps(args.to_dict(), indent=2, sort_keys=True, default=str) + "\n",
        io=io if io is not None else CheckpointIO(),
    )


def write_snapshot(snap: Snapshot, folder: Path) -> None:
    """Write `snap` into `folder` (the temporary folder of an atomic checkpoint)."""
    io = snap.io
    if snap.is_main:
        io.write_model(folder, snap.model, snap.processing_class, snap.model_state)
        io.write_run_files(folder, snap.trainer_state_json, snap.args_json)
        if snap.optimizer is not None:
            io.write_optimizer(folder, snap.optimizer)
        if snap.trainer is not None:
            io.write_trainer(folder, snap.trainer)
    if snap.rank_state is not None:
        io.write_rank(folder, snap.rank, snap.rank_state)


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the model of a checkpoint folder into `model` (full, sharded, PEFT adapter or plain)."""
    load_model_files(model, folder)


def restore_training_state(
    parts: Parts, strategy: Strategy, args: TrainingArguments, folder: Path, io: CheckpointIO | None = None
) -> None:
    """Put every part back as it was when `folder` was written."""
    io = io if io is not None else CheckpointIO()
    if not io.has_trainer(folder):
        raise ValueError(
            f"{folder} was written with save_only_model=True: it holds the model but no optimizer, "
            "scheduler or data position, so training cannot resume from it exactly. Load the model with "
            "from_pretrained and start a new run, or resume from a full checkpoint."
        )
    strategy.load_checkpoint(parts, io, folder)
    shared = io.read_trainer(folder)
    _warn_on_changed_shape(args, strategy.world_size, io.args_path(folder), folder, shared)
    _warn_on_changed_sampler(parts.sampler, shared.get("sampler") or {})
    restore_order = getattr(parts.sampler, "restore_drawn_order", None)
    if restore_order is not None:
        restore_order(shared.get("sampler") or {})  # use_seedable_sampler=False: the epoch's drawn shuffle
    if parts.scheduler is not None and shared["scheduler"]:
        parts.scheduler.load_state_dict(shared["scheduler"])
    parts.precision.load_state_dict(shared["precision"])
    parts.progress.load_state_dict(shared)
    if args.ignore_data_skip:
        parts.progress.restart_epoch_data()
    if parts.batch_split is not None and "batch_split" in shared:
        parts.batch_split.load_state_dict(shared["batch_split"])  # what auto_find_batch_size found
    if parts.guard is not None:
        parts.guard.load_state_dict(shared.get("guard") or {})  # step-guard counters, spike window
    mine = io.read_rank(folder, strategy.rank)
    if mine is not None:
        parts.rng.load_state_dict(mine["rng"])
        parts.progress.load_local_state_dict(mine)
    else:
        logger.warning(
            "%s has no random state for rank %d (saved with another world size); the "
            "run continues, but not bit-exactly.",
            folder,
            strategy.rank,
        )


def _warn_on_changed_sampler(sampler: Stateful | None, saved: dict[str, Any]) -> None:
    if sampler is None or not saved:
        return
    now = sampler.state_dict()
    keys = ("seed", "num_samples", "shuffle", "drop_last", "group_by_length", "sortish")
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in keys if k in saved and saved[k] != now.get(k)]
    if changed:
        logger.warning(
            "The training data order differs from the checkpoint's (%s): the resumed run "
            "sees other samples than an uninterrupted one would.",
            "; ".join(changed),
        )


def _warn_on_changed_shape(
    args: TrainingArguments, world_size: int, args_file: Path, folder: Path, shared: Mapping[str, Any]
) -> None:
    try:
        saved_args = read_json(args_file)
    except CheckpointError:
        return
    if not isinstance(saved_args, dict):
        return
    changes = [
        f"{name} {saved_args.get(name)} -> {getattr(args, name)}"
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps")
        if saved_args.get(name) is not None and saved_args.get(name) != getattr(args, name)
    ]
    if int(shared.get("world_size", 1)) != world_size:
        changes.append(f"world size {shared.get('world_size')} -> {world_size}")
    if changes:
        logger.warning(
            "Resuming from %s with a different batch shape (%s): the data position is kept in optimizer "
            "steps, so samples are skipped or repeated and the run will not match an uninterrupted one.",
            folder,
            "; ".join(changes),
        )


def _keep_saved_intervals(
    state: TrainerState, saved: TrainerState, folder: Path, per_device_batch: int | None = None
) -> None:
    """As transformers: the checkpoint's logging/eval/save intervals go on; say so when args differ."""
    # One warning, each difference worded as transformers words it (scripts and tests grep it).
    lines = []
    for kind in ("logging_steps", "eval_steps", "save_steps"):
        old, new = getattr(saved, kind), getattr(state, kind)
        if old != new:
            lines.append(f"\n\t{kind}: {new} (from args) != {old} (from trainer_state.json)")
            setattr(state, kind, old)
    if per_device_batch is not None and saved.train_batch_size and per_device_batch != saved.train_batch_size:
        lines.append(
            f"\n\tper_device_train_batch_size: {per_device_batch} (from args) != "
            f"{saved.train_batch_size} (from trainer_state.json)"
        )
    if lines:
        logger.warning(
            f"Resuming from {folder}: these arguments differ from the checkpoint's trainer_state.json; "
            "the logging/eval/save intervals go on as the checkpoint has them (as transformers does):"
            + "".join(lines)
        )


def save_checkpoint(
    parts: Parts,
    strategy: Strategy,
    io: CheckpointIO,
    args: TrainingArguments,
    state: TrainerState,
    processing_class: Any = None,
    on_commit: Callable[[Path], None] | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Write `output_dir/checkpoint-N/` atomically (in the background with save_async).

    `on_commit(folder)` runs once the folder is in place and before older ones are rotated away,
    on the thread that wrote it (the Hub push starts there); it must not raise. `ready` runs once
    this rank's own state is gathered, before the save's first collective."""
    final = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    if state.best_global_step == state.global_step:
        state.best_model_checkpoint = str(final)
    state.stateful_callbacks = parts.callbacks.state_dict()
    if args.save_async:
        io.wait()
    if ready is not None:
        ready()
    staging = io.staging if args.save_async else None
    snapshot = take_snapshot(parts, strategy, args, state, processing_class, staging, io)
    limit, best = args.save_total_limit, state.best_model_checkpoint
    output_dir = Path(args.output_dir)

    def rotate() -> None:
        if on_commit is not None:
            on_commit(final)
        if strategy.is_main:
            rotate_checkpoints(output_dir, limit, keep={Path(best)} if best else set())

    # Looked up at call time, so a test that replaces write_snapshot sees its replacement called.
    strategy.write_checkpoint(parts, io, final, lambda tmp: write_snapshot(snapshot, tmp), rotate)


# What a checkpoint's trainer_state.json gives back to the live TrainerState on resume.
_RESUMED_STATE_FIELDS = (
    "epoch",
    "global_step",
    "log_history",
    "best_metric",
    "best_global_step",
    "best_model_checkpoint",
    "num_input_tokens_seen",
    "total_flos",
    "stateful_callbacks",
)


def resume(
    parts: Parts,
    strategy: Strategy,
    args: TrainingArguments,
    state: TrainerState,
    checkpoint: str | bool,
    io: CheckpointIO | None = None,
) -> Path:
    """Load `checkpoint` (or, with True, the newest complete one in output_dir) into the parts and
    `state`; returns the folder it came from."""
    io = io if io is not None else CheckpointIO()
    folder = _agreed_checkpoint_folder(strategy, args, checkpoint)
    state_file = io.trainer_state_path(folder)
    saved = TrainerState.load_from_json(str(state_file))  # checked by the line above
    # A moved run folder still names its best checkpoint by the old path: find it in this one.
    saved.best_model_checkpoint = relocate_in_run(saved.best_model_checkpoint, args.output_dir, state_file)
    # With auto_find_batch_size the saved batch is the one found, not a changed argument.
    batch = None if args.auto_find_batch_size else args.per_device_train_batch_size
    _keep_saved_intervals(state, saved, folder, batch)
    for name in _RESUMED_STATE_FIELDS:
        setattr(state, name, getattr(saved, name))
    restore_training_state(parts, strategy, args, folder, io)
    if args.restore_callback_states_from_checkpoint:
        parts.callbacks.load_state_dict(saved.stateful_callbacks)
    elif set(saved.stateful_callbacks) - {"TrainerControl"}:
        logger.warning(
            "The checkpoint holds the state of %s, which starts fresh because "
            "restore_callback_states_from_checkpoint=False (the transformers default); set it to True "
            "for a resume that matches an uninterrupted run.",
            ", ".join(sorted(set(saved.stateful_callbacks) - {"TrainerControl"})),
        )
    logger.info(
        "Resumed from %s at step %d (epoch %d, step %d of it).",
        folder,
        state.global_step,
        parts.progress.epoch,
        parts.progress.step_in_epoch,
    )
    return folder


def _agreed_checkpoint_folder(strategy: Strategy, args: TrainingArguments, checkpoint: str | bool) -> Path:
    """The checkpoint folder to resume from, checked (hashes too unless `verify_checkpoints=False`)
    by the main process alone and sent to every rank, so the files are hashed once, not once per
    rank, and every rank resumes from the same folder or stops with the same error."""
    deep = args.verify_checkpoints
    if strategy.world_size == 1:
        return _checkpoint_folder(args.output_dir, checkpoint, deep)
    found: Path | None = None
    error: Exception | None = None
    failure: tuple[bool, str] | None = None
    if strategy.is_main:
        try:
            found = _checkpoint_folder(args.output_dir, checkpoint, deep)
        except Exception as exc:  # any error: the other ranks wait for the answer
            error, failure = exc, (isinstance(exc, ValueError), str(exc))
    name, failure = strategy.broadcast_object((str(found) if found is not None else None, failure))
    if error is not None:
        raise error
    if failure is not None:
        is_value_error, message = failure
        raise (ValueError if is_value_error else CheckpointError)(message)
    return Path(name)


def _checkpoint_folder(output_dir: str, checkpoint: str | bool, deep: bool) -> Path:
    if checkpoint is not True:
        # Kept as given: a HashedCheckpoint (auto_resume's pick) is not hashed a second time.
        return load_checkpoint_dir(checkpoint if isinstance(checkpoint, str) else str(checkpoint), deep=deep)
    found = find_resumable_checkpoint(output_dir, deep=deep)
    if found is None:
        raise ValueError(
            f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint; "
            "start without resume_from_checkpoint or point it at a checkpoint folder."
        )
    return found
