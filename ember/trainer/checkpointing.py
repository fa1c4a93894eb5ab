"""`Checkpointer`, the Trainer's collaborator for checkpoint folders: it holds the checkpoint IO (and
through it the background writer) and hands the run's named parts to `checkpoint.training`, which
never sees the Trainer. The layout of a checkpoint is not decided here: `checkpoint.io` names the
files and the strategy writes the parts through it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.hub import HubSync
from ..checkpoint.io import CheckpointIO
from ..checkpoint.writer import CheckpointWriter

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..callbacks.state import TrainerState
    from ..checkpoint.training import Parts
    from ..strategy.base import Strategy


class Checkpointer:
    """Saves and resumes a run's parts; one per Trainer (its writer outlives a run's last save)."""

    def __init__(self, strategy: Strategy, save_async: bool, hub: HubSync | None = None) -> None:
        self.strategy = strategy
        self.io = CheckpointIO(async_=save_async)
        self.hub = hub

    @property
    def writer(self) -> CheckpointWriter:
        return self.io.writer

    def save(
        self,
        parts: Parts,
        args: TrainingArguments,
        state: TrainerState,
        processing_class: Any,
        ready: Callable[[], None] | None = None,
    ) -> bool:
        """Write `output_dir/checkpoint-N/` atomically (in the background with save_async); with
        push_to_hub, push it once it is in place (main process). True when this save pushes.
        `ready` runs once this rank's own state is gathered, before the save's first collective."""
        from ..checkpoint.training import save_checkpoint

        push = None
        if self.hub is not None and args.push_to_hub and self.strategy.is_main:
            if args.save_strategy == "steps":
                message = f"Training in progress, step {state.global_step}"
            else:
                message = f"Training in progress, epoch {int(state.epoch or 0)}"
            # The previous save's push starts when its write ends: wait for it (the save below
            # would), so `busy` sees that push.
            self.wait()
            push = self.hub.plan_checkpoint_push(message)
        save_checkpoint(
            parts, self.strategy, self.io, args, state, processing_class, on_commit=push, ready=ready
        )
        return push is not None

    def resume(
        self, parts: Parts, args: TrainingArguments, state: TrainerState, checkpoint: str | bool
    ) -> None:
        from ..checkpoint.training import resume

        resume(parts, self.strategy, args, state, checkpoint, self.io)

    def keep_only_best(self, args: TrainingArguments, state: TrainerState) -> None:
        """As transformers: with save_total_limit=1, a finished run leaves only the best checkpoint."""
        from ..checkpoint.rotation import keep_only

        if self.strategy.is_main:
            keep_only(args.output_dir, Path(str(state.best_model_checkpoint)))
        self.strategy.barrier()

    def wait(self) -> None:
        """Block until a save in flight is on disk (its error raises here)."""
        self.writer.wait()

    def settle(self) -> None:
        """Let a save in flight finish while another error propagates (its own error is logged)."""
        self.writer.settle()
