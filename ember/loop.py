"""One optimizer step: micro-batches, exact loss normalisation, backward, clip, step.

Kept apart from the trainer so the hot path is small enough to read in one sitting and to profile
on its own. Everything here runs once per optimizer step; nothing calls `.item()`, so the host
never waits for the device inside a step.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .loss import count_targets

if TYPE_CHECKING:
    from .trainer import Trainer


def grouped(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Micro-batches in groups of `size` (the last group of an epoch may be shorter).

    The whole group is fetched before the step starts, because the target count of the step must
    be known before the first backward.
    """
    it = iter(batches)
    while group := list(islice(it, size)):
        yield group


def run_optimizer_step(
    trainer: Trainer, model: nn.Module, micro_batches: list[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward/backward every micro-batch, then clip and step. Returns (step loss, grad norm).

    The step loss is the mean over all targets of the step on all ranks, the same number one
    big batch would give.
    """
    strategy, precision, cb = trainer.strategy, trainer.precision, trainer.callback_handler
    args, state = trainer.args, trainer.state
    counts = [count_targets(b, trainer.label_shift) for b in micro_batches]
    total = strategy.all_reduce_sum(torch.stack(counts).sum().to(strategy.device, non_blocking=True))
    total = total.clamp_(min=1)
    step_loss = torch.zeros((), device=strategy.device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        # A micro-batch with no target contributes nothing; its mean loss would be 0/0 = nan.
        if i < last and int(counts[i]) == 0:
            trainer.control = cb.on_substep_end(args, state, trainer.control)
            continue
        with strategy.no_sync(model, sync=i == last):
            step_loss += trainer.training_step(model, batch, total)
        if i < last:
            trainer.control = cb.on_substep_end(args, state, trainer.control)

    optimizer = trainer.optimizer
    assert optimizer is not None, "train() builds the optimizer before the first step"
    grad_norm = None
    if args.max_grad_norm and args.max_grad_norm > 0:
        precision.unscale_(optimizer)
        grad_norm = strategy.clip_grad_norm(model, args.max_grad_norm)
    trainer.control = cb.on_pre_optimizer_step(args, state, trainer.control)
    precision.step(optimizer)
    trainer.control = cb.on_optimizer_step(args, state, trainer.control)
    # The step log reports the rate this update used, as transformers does (read before it moves).
    trainer._step_lr = float(optimizer.param_groups[0]["lr"])
    if not precision.step_was_skipped() and not trainer.scheduler_waits_for_metrics:
        trainer.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


class LossTracker:
    """Running loss for logging, kept on the device until a log line needs it.

    Each step only appends its (detached) loss to a list: no kernel, no sync. At log time the
    step losses are stacked, summed across ranks, and averaged; with transformers' NaN/inf
    filter on, a non-finite step adds the running sum of its window divided by (steps before
    it + 1). `total` is what `train_loss` reports and what a checkpoint stores, so a resumed run
    logs the same train_loss as an uninterrupted one.
    """

    def __init__(self, device: torch.device, filter_nan_inf: bool) -> None:
        self.device = device
        self.filter = filter_nan_inf
        self.pending: list[torch.Tensor] = []
        self.total = 0.0
        self.total_steps = 0

    @property
    def steps_since_log(self) -> int:
        return len(self.pending)

    def add(self, step_loss: torch.Tensor) -> None:
        self.pending.append(step_loss.detach())

    def pop_mean(self, all_reduce_sum: Any) -> float:
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

    def state_dict(self) -> dict[str, Any]:
        # `pending` is this rank's share of the steps not yet logged; each rank restores its own.
        return {
            "total": self.total,
            "total_steps": self.total_steps,
            "pending": [float(x) for x in self.pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = float(state["total"])
        self.total_steps = int(state["total_steps"])
        self.pending = [torch.tensor(x, device=self.device) for x in state.get("pending", [])]


class TrainPlan:
    """How long training runs: optimizer steps, epochs, and steps per epoch (None if unknown)."""

    def __init__(self, max_steps: int, num_epochs: int, steps_per_epoch: int | None, batch_size: int) -> None:
        self.max_steps, self.num_epochs, self.steps_per_epoch = max_steps, num_epochs, steps_per_epoch
        self.samples_per_step = batch_size

    def num_samples_seen(self, steps: int) -> int:
        return steps * self.samples_per_step


def plan_steps(args: Any, loader: Any, batch_sampler: Any) -> TrainPlan:
    """transformers' arithmetic: steps per epoch = ceil(micro-batches / GA); max_steps wins if set."""
    ga = args.gradient_accumulation_steps
    samples_per_step = args.per_device_train_batch_size * ga * args.world_size  # all ranks, as transformers
    if batch_sampler is None:  # an IterableDataset: length unknown
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
