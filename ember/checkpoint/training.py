"""What a training checkpoint holds, and how the trainer's parts go in and come back out.

Layout of `checkpoint-N/` (everything but the model is safetensors + JSON, never pickle)::

    config.json, model.safetensors[.index.json], tokenizer files   # as save_pretrained writes them
    trainer_state.json                                              # transformers' format
    training_args.json
    optimizer.{safetensors,json}                                    # optimizer.state_dict()
    trainer.{safetensors,json}     # scheduler, precision (grad scaler), data position, loss totals
    rank-<r>.{safetensors,json}    # per process: RNG states, its share of the running loss
    manifest.json                  # written last: sizes and sha256 of every file above

Every part is a `state_dict()`; this module only moves those dicts. A snapshot is taken on the
training thread (copied to CPU when the write runs in the background), and the write touches only
the snapshot, so training may go on while it runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..state import TrainerState, export_callback_states, restore_callback_states
from .atomic import find_resumable_checkpoint, load_checkpoint_dir
from .files import CheckpointError, read_json, relocate_in_run, resolve_inside, write_text
from .model import WEIGHTS_NAME, save_model_files
from .rng import capture_rng_state, restore_rng_state
from .rotation import rotate_checkpoints
from .state_io import load_state, save_state
from .writer import StagingBuffers

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
ARGS_NAME = "training_args.json"
OPTIMIZER = "optimizer"
TRAINER = "trainer"


def rank_name(rank: int) -> str:
    return f"rank-{rank}"


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


def take_snapshot(trainer: Trainer, copy: bool) -> Snapshot:
    """Gather the state dicts of every part; with `copy`, on CPU and independent of training."""
    strategy = trainer.strategy
    only_model = trainer.args.save_only_model
    # Every rank asks (gathering a sharded model is a collective); only the main process keeps it.
    full_model = strategy.model_state_dict(trainer.model_wrapped)
    model_state = full_model if strategy.is_main else None
    optimizer = (
        None
        if only_model or not strategy.is_main
        else strategy.optimizer_state_dict(trainer.model_wrapped, trainer.optimizer)
    )
    shared = None
    if not only_model and strategy.is_main:
        sampler = trainer._train_batch_sampler
        shared = {
            "scheduler": trainer.lr_scheduler.state_dict() if trainer.lr_scheduler is not None else {},
            "precision": trainer.precision.state_dict(),
            "position": dict(trainer._position),
            "sampler": sampler.state_dict() if sampler is not None else {},
            "loss": {"total": trainer._loss.total, "total_steps": trainer._loss.total_steps},
            "last_logged_step": trainer._last_logged_step,
            "world_size": strategy.world_size,
        }
    rank_state = None
    if not only_model:
        rank_state = {
            "rng": capture_rng_state(),
            "loss_pending": [float(x) for x in trainer._loss.pending],
        }
    if copy:
        # The previous snapshot's buffers are reused, so its write must be over (save_checkpoint
        # waits for it before calling this).
        staging = trainer.__dict__.setdefault("_staging_buffers", StagingBuffers())
        model_state, optimizer, shared, rank_state = staging.snapshot(
            (model_state, optimizer, shared, rank_state)
        )
    return Snapshot(
        rank=strategy.rank,
        is_main=strategy.is_main,
        model=strategy.unwrap(trainer.model_wrapped),
        model_state=model_state,
        processing_class=trainer.processing_class,
        optimizer=optimizer,
        trainer=shared,
        rank_state=rank_state,
        trainer_state_json=trainer.state.to_json_string(),
        args_json=json.dumps(trainer.args.to_dict(), indent=2, sort_keys=True, default=str) + "\n",
    )


def write_snapshot(snap: Snapshot, folder: Path) -> None:
    """Write `snap` into `folder` (the temporary folder of an atomic checkpoint)."""
    if snap.is_main:
        save_model_files(snap.model, folder, snap.processing_class, state_dict=snap.model_state)
        write_text(folder / TRAINER_STATE_NAME, snap.trainer_state_json)
        write_text(folder / ARGS_NAME, snap.args_json)
        if snap.optimizer is not None:
            save_state(snap.optimizer, folder, OPTIMIZER)
        if snap.trainer is not None:
            save_state(snap.trainer, folder, TRAINER)
    if snap.rank_state is not None:
        save_state(snap.rank_state, folder, rank_name(snap.rank))


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the weights of a checkpoint folder into `model` (single file or sharded with an index)."""
    from safetensors.torch import load_file

    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.exists():
        doc = read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map; the file is damaged.")
        shards = {resolve_inside(folder, v, index, f"weight_map[{k!r}]") for k, v in weight_map.items()}
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(shards):
            tensors.update(load_file(str(shard)))
    elif (folder / WEIGHTS_NAME).exists():
        tensors = load_file(str(folder / WEIGHTS_NAME))
    else:
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}; it is not a checkpoint of a model.")
    result = model.load_state_dict(tensors, strict=False)
    own = model.state_dict()
    loaded = {_storage(own[k]) for k in tensors if k in own}
    # Tied weights (e.g. lm_head = wte) are written once; their twins share storage and are filled.
    missing = [k for k in result.missing_keys if _storage(own[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The weights in {folder} do not fit the model: missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}. Was the checkpoint written for another architecture?"
        )


def _storage(t: torch.Tensor) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr(), int(t.storage_offset()))


def restore_training_state(trainer: Trainer, folder: Path) -> None:
    """Put every part of `trainer` back as it was when `folder` was written."""
    strategy = trainer.strategy
    if not (folder / f"{TRAINER}.json").exists():
        raise ValueError(
            f"{folder} was written with save_only_model=True: it holds the model but no optimizer, "
            "scheduler or data position, so training cannot resume from it exactly. Load the model with "
            "from_pretrained and start a new run, or resume from a full checkpoint."
        )
    strategy.load_model_and_optimizer(trainer.model_wrapped, trainer.optimizer, folder)
    shared = load_state(folder, TRAINER)
    _warn_on_changed_shape(trainer, folder, shared)
    _warn_on_changed_sampler(trainer, shared.get("sampler") or {})
    if trainer.lr_scheduler is not None and shared["scheduler"]:
        trainer.lr_scheduler.load_state_dict(shared["scheduler"])
    trainer.precision.load_state_dict(shared["precision"])
    trainer._loss.total = float(shared["loss"]["total"])
    trainer._loss.total_steps = int(shared["loss"]["total_steps"])
    trainer._last_logged_step = int(shared["last_logged_step"])
    position = {k: int(v) for k, v in shared["position"].items()}
    if trainer.args.ignore_data_skip:
        # transformers' meaning: keep the epoch count, but start that epoch's data from its beginning.
        position["step_in_epoch"] = 0
    trainer._position = position
    rank_file = folder / f"{rank_name(strategy.rank)}.json"
    if rank_file.exists():
        mine = load_state(folder, rank_name(strategy.rank))
        restore_rng_state(mine["rng"])
        device = trainer._loss.device
        trainer._loss.pending = [torch.tensor(x, device=device) for x in mine["loss_pending"]]
    else:
        logger.warning(
            "%s has no random state for rank %d (saved with another world size); the "
            "run continues, but not bit-exactly.",
            folder,
            strategy.rank,
        )


def _warn_on_changed_sampler(trainer: Trainer, saved: dict[str, Any]) -> None:
    sampler = trainer._train_batch_sampler
    if sampler is None or not saved:
        return
    now = sampler.state_dict()
    keys = ("seed", "num_samples", "shuffle", "drop_last", "group_by_length")
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in keys if k in saved and saved[k] != now.get(k)]
    if changed:
        logger.warning(
            "The training data order differs from the checkpoint's (%s): the resumed run "
            "sees other samples than an uninterrupted one would.",
            "; ".join(changed),
        )


def _warn_on_changed_shape(trainer: Trainer, folder: Path, shared: dict[str, Any]) -> None:
    try:
        saved_args = read_json(folder / ARGS_NAME)
    except CheckpointError:
        return
    if not isinstance(saved_args, dict):
        return
    now = trainer.args
    changes = [
        f"{name} {saved_args.get(name)} -> {getattr(now, name)}"
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps")
        if saved_args.get(name) is not None and saved_args.get(name) != getattr(now, name)
    ]
    if int(shared.get("world_size", 1)) != trainer.strategy.world_size:
        changes.append(f"world size {shared.get('world_size')} -> {trainer.strategy.world_size}")
    if changes:
        logger.warning(
            "Resuming from %s with a different batch shape (%s): the data position is kept in optimizer "
            "steps, so samples are skipped or repeated and the run will not match an uninterrupted one.",
            folder,
            "; ".join(changes),
        )


def _keep_saved_intervals(trainer: Trainer, saved: TrainerState, folder: Path) -> None:
    """As transformers: the checkpoint's logging/eval/save intervals go on; say so when args differ."""
    for kind in ("logging_steps", "eval_steps", "save_steps"):
        old, new = getattr(saved, kind), getattr(trainer.state, kind)
        if old != new:
            logger.warning(
                "Resuming from %s: %s is %s in the checkpoint and %s in the arguments; the run goes on "
                "with the checkpoint's %s (as transformers does). Start a new run to change it.",
                folder,
                kind,
                old,
                new,
                old,
            )
            setattr(trainer.state, kind, old)


def save_checkpoint(trainer: Trainer) -> None:
    """Write `output_dir/checkpoint-N/` atomically (in the background with save_async)."""
    final = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if trainer.state.best_global_step == trainer.state.global_step:
        trainer.state.best_model_checkpoint = str(final)
    trainer.state.stateful_callbacks = export_callback_states(
        trainer.callback_handler.callbacks, trainer.control
    )
    if trainer.args.save_async:
        trainer._checkpoint_writer.wait()
    snapshot = take_snapshot(trainer, copy=trainer.args.save_async)
    limit, best = trainer.args.save_total_limit, trainer.state.best_model_checkpoint
    output_dir = Path(trainer.args.output_dir)

    def rotate() -> None:
        if trainer.strategy.is_main:
            rotate_checkpoints(output_dir, limit, keep={Path(best)} if best else set())

    trainer.strategy.write_checkpoint(
        trainer._checkpoint_writer, final, lambda tmp: write_snapshot(snapshot, tmp), rotate
    )


def resume(trainer: Trainer, checkpoint: str | bool) -> None:
    """Load `checkpoint` (or, with True, the newest complete one in output_dir) into `trainer`."""
    deep = trainer.args.verify_checkpoints
    if checkpoint is True:
        found = find_resumable_checkpoint(trainer.args.output_dir, deep=deep)
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint=True but {trainer.args.output_dir} holds no complete checkpoint; "
                "start without resume_from_checkpoint or point it at a checkpoint folder."
            )
        folder = found
    else:
        folder = load_checkpoint_dir(str(checkpoint), deep=deep)
    saved = TrainerState.load_from_json(str(folder / TRAINER_STATE_NAME))  # checked by the line above
    # A moved run folder still names its best checkpoint by the old path: find it in this one.
    saved.best_model_checkpoint = relocate_in_run(
        saved.best_model_checkpoint, trainer.args.output_dir, folder / TRAINER_STATE_NAME
    )
    _keep_saved_intervals(trainer, saved, folder)
    for name in (
        "epoch",
        "global_step",
        "log_history",
        "best_metric",
        "best_global_step",
        "best_model_checkpoint",
        "num_input_tokens_seen",
        "total_flos",
        "stateful_callbacks",
    ):
        setattr(trainer.state, name, getattr(saved, name))
    restore_training_state(trainer, folder)
    if trainer.args.restore_callback_states_from_checkpoint:
        restore_callback_states(trainer.callback_handler.callbacks, saved.stateful_callbacks, trainer.control)
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
        trainer.state.global_step,
        trainer._position["epoch"],
        trainer._position["step_in_epoch"],
    )
