"""Where a run stands: its length plan, its position in the data, and its running loss.

`RunProgress` is the one object that moves as training moves (epoch, step in epoch, last logged
step, loss totals) and the one a checkpoint saves for it, through `state_dict()` /
`load_state_dict()`. The loss a rank has not logged yet is its own (`local_state_dict()`), so each
rank writes and restores its share.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..args.accelerator_config import rank_batch_size

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments


class LossTracker:
    """Running loss for logging, kept on the device until a log line needs it.

    Each step only appends its (detached) loss to a list: no kernel, no sync. At log time the
    step losses are stacked, summed across ranks, and averaged; with transformers' NaN/inf
    filter on, a non-finite step adds the running sum of its window divided by (steps before
    it + 1). `total` is what `train_loss` reports and what a checkpoint stores, so a resumed run
    logs the same train_loss as an uninterrupted one.

    A step the guard skipped (non-finite gradients, or no target token on any rank) has no loss: it
    is not a loss of 0. It is left out of the window and of `train_loss`, and only counted
    (`skipped`), so its log entry can say what happened. Every rank skips the same steps (the
    decision is global), so every rank's window holds the same number of steps.
    """

    #: Why a step is left out of the loss; a rolled-back spike keeps its (real, measured) loss.
    NOT_A_LOSS = ("nonfinite", "empty")

    def __init__(self, device: torch.device, filter_nan_inf: bool) -> None:
        self.device = device
        self.filter = filter_nan_inf
        self.pending: list[torch.Tensor] = []
        self.total = 0.0
        self.total_steps = 0
        self.skipped: dict[str, int] = {}  # skipped steps since the last log, by reason

    @property
    def steps_since_log(self) -> int:
        return len(self.pending)

    @property
    def skipped_since_log(self) -> int:
        return sum(self.skipped.values())

    def add(self, step_loss: torch.Tensor, skipped: str | None = None) -> None:
        if skipped in self.NOT_A_LOSS:
            assert skipped is not None
            self.skipped[skipped] = self.skipped.get(skipped, 0) + 1
            return
        self.pending.append(step_loss.detach())

    def pop_skipped(self) -> dict[str, int]:
        """The steps skipped since the last call, by reason ('nonfinite', 'empty')."""
        skipped, self.skipped = self.skipped, {}
        return skipped

    def pop_mean(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Mean step loss since the last call (global across ranks); folds it into `total`."""
        if not self.pending:
            return math.nan
        losses = all_reduce_sum(torch.stack(self.pending).double())
        steps = len(self.pending)
        self.pending = []
        if self.filter:
            # transformers' rule: a non-finite step adds the mean of this window so far (steps
            # before it), so a window of only non-finite steps logs 0.0, never nan.
            window = 0.0
            for i, value in enumerate(losses.tolist()):
                window += value if math.isfinite(value) else window / (1 + i)
            mean = window / steps
        else:
            mean = float(losses.mean())
        self.total += mean * steps
        self.total_steps += steps
        return mean

    def mean(self) -> float:
        """The mean loss of the run's counted steps so far (what `train_loss` reports); nan if none."""
        return self.total / self.total_steps if self.total_steps else math.nan


@dataclass
class RunProgress:
    """The run's position: epoch, optimizer steps into it, last logged step, and loss totals.

    The data position is kept in optimizer steps, not batches: a resumed run asks its sampler to
    skip `step_in_epoch x gradient_accumulation_steps` batches, in O(1).
    """

    loss: LossTracker
    epoch: int = 0
    step_in_epoch: int = 0
    last_logged_step: int = 0

    def start_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.step_in_epoch = epoch, 0

    def advance(self) -> None:
        self.step_in_epoch += 1

    def end_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def restart_epoch_data(self) -> None:
        """transformers' `ignore_data_skip`: keep the epoch count, start its data from the top."""
        self.step_in_epoch = 0

    # The keys are those checkpoints have always had in trainer.json and rank-<r>.json.
    def state_dict(self) -> dict[str, Any]:
        return {
            "position": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch},
            "loss": {
                "total": self.loss.total,
                "total_steps": self.loss.total_steps,
                "skipped_since_log": dict(self.loss.skipped),
            },
            "last_logged_step": self.last_logged_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["position"]["epoch"])
        self.step_in_epoch = int(state["position"]["step_in_epoch"])
        self.loss.total = float(state["loss"]["total"])
        self.loss.total_steps = int(state["loss"]["total_steps"])
        skipped = state["loss"].get("skipped_since_log", {})
        self.loss.skipped = {str(k): int(v) for k, v in skipped.items()}
        self.last_logged_step = int(state["last_logged_step"])

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's share of the steps not logged yet."""
        return {"loss_pending": [float(x) for x in self.loss.pending]}

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        device = self.loss.device
        self.loss.pending = [torch.tensor(x, device=device) for x in state.get("loss_pending", [])]


@dataclass
class TrainPlan:
    """How long training runs: optimizer steps, epochs, and steps per epoch (None if unknown)."""

    max_steps: int
    num_epochs: int
    steps_per_epoch: int | None
    samples_per_step: int = field(default=0)

    def num_samples_seen(self, steps: int) -> int:
        return steps * self.samples_per_step


def plan_steps(args: TrainingArguments, batch_sampler: Sized | None, world_size: int) -> TrainPlan:
    """transformers' arithmetic: steps per epoch = ceil(micro-batches / GA); max_steps wins if set.

    `batch_sampler` is None for an IterableDataset (its length is unknown); `world_size` is the
    number of data-parallel ranks, which the global batch counts.
    """
    ga = args.gradient_accumulation_steps
    rank_batch = rank_batch_size(args.per_device_train_batch_size, args, world_size)  # split_batches
    samples_per_step = rank_batch * ga * world_size  # all ranks, as transformers
    if batch_sampler is None:
        if args.max_steps <= 0:
            raise ValueError(
                "max_steps must be set (> 0) when train_dataset is an IterableDataset: "
                "its length is unknown, so epochs cannot be counted."
            )
        return TrainPlan(args.max_steps, sys.maxsize, None, samples_per_step)
    micro_batches = len(batch_sampler)
    if micro_batches == 0:
        raise ValueError(
            "The training set yields no batch: it is smaller than per_device_train_batch_size "
            "with dataloader_drop_last=True; lower the batch size or set dataloader_drop_last=False."
        )
    steps_per_epoch = max(math.ceil(micro_batches / ga), 1)
    if args.max_steps > 0:
        return TrainPlan(
            args.max_steps, math.ceil(args.max_steps / steps_per_epoch), steps_per_epoch, samples_per_step
        )
    max_steps = math.ceil(args.num_train_epochs * steps_per_epoch)
    return TrainPlan(max_steps, math.ceil(args.num_train_epochs), steps_per_epoch, samples_per_step)
