"""One optimizer step: micro-batches, exact loss normalisation, backward, clip, step.

Kept apart from the trainer so the hot path is small enough to read in one sitting and to profile
on its own. Everything here runs once per optimizer step; nothing calls `.item()`, so the host
never waits for the device inside a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..args.accelerator_config import accelerator_config_of
from ..data.checks import check_step_batches
from .loss import count_targets

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..callbacks.state import TrainerState
    from ..strategy.base import Strategy
    from .guards import StepGuard
    from .run_position import RunProgress


@dataclass
class StepContext:
    """What one optimizer step works with, built once per run by the trainer.

    The parts are the run's own (the model as the strategy wrapped it, the optimizer and scheduler it
    set up, the run position and the guard); `training_step` and `fire` are the trainer's bound
    methods, so a subclass's `training_step` is the one that runs and callbacks see every substep.
    """

    args: TrainingArguments
    state: TrainerState
    strategy: Strategy
    model_wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    label_shift: bool
    progress: RunProgress
    guard: StepGuard
    training_step: Callable[[nn.Module, dict[str, Any], torch.Tensor | None], torch.Tensor]
    fire: Callable[[str], None]
    #: The first micro-batch is checked against the model once per run (token ids, label shapes).
    first_batch_checked: bool = False
    #: False while a micro-batch's gradients stay local (all but the last of a step): what
    #: `accelerator.sync_gradients` reports to a custom training_step.
    sync_gradients: bool = True

    @property
    def scheduler_waits_for_metrics(self) -> bool:
        return isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


@dataclass
class StepResult:
    """What one optimizer step reports: its loss (on the device), grad norm, and learning rate."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    learning_rate: float
    #: Why the update was not applied ('nonfinite', 'empty', 'spike'), None when it was.
    skipped: str | None = None


def grouped(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Micro-batches in groups of `size` (the last group of an epoch may be shorter).

    The whole group is fetched before the step starts, because the target count of the step must
    be known before the first backward.
    """
    it = iter(batches)
    while group := list(islice(it, size)):
        yield group


def target_counts(
    micro_batches: list[dict[str, Any]],
    label_shift: bool,
    strategy: Strategy,
    device: torch.device | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each micro-batch's target count, their sum on this rank, and their sum on all ranks: the
    divisor that makes the micro-batch losses add up to the step's exact mean."""
    counts = [count_targets(b, label_shift) for b in micro_batches]
    local = torch.stack(counts).sum()
    total = strategy.all_reduce_sum(local.to(device or strategy.device, non_blocking=True))
    return counts, local, total


def run_optimizer_step(run: StepContext, micro_batches: list[dict[str, Any]]) -> StepResult:
    """Forward/backward every micro-batch, then clip, step the optimizer and the scheduler.

    The step loss is the mean over all targets of the step on all ranks, the same number one
    big batch would give.
    """
    strategy, model, optimizer = run.strategy, run.model_wrapped, run.optimizer
    precision = strategy.precision
    args = run.args
    check_step_batches(run, model, micro_batches)
    counts, local, total = target_counts(micro_batches, run.label_shift, strategy)
    if run.guard.is_empty_step(run, local):
        learning_rate = float(optimizer.param_groups[0]["lr"])
        return StepResult(torch.zeros((), device=strategy.device), None, learning_rate, skipped="empty")
    targets, total = total, total.clamp(min=1)
    sync_each = accelerator_config_of(args).sync_each_batch
    step_loss = torch.zeros((), device=strategy.device)
    last = len(micro_batches) - 1
    reduced = False  # whether this step's gradients were reduced already (sync_each_batch)
    for i, batch in enumerate(micro_batches):
        # A micro-batch with no target contributes nothing; its mean loss would be 0/0 = nan.
        if i < last and int(counts[i]) == 0:
            run.fire("on_substep_end")
            continue
        run.sync_gradients = i == last
        # sync_each_batch (accelerator_config's gradient_accumulation_kwargs): reduce the gradients
        # after every micro-batch, trading speed for not holding unreduced gradients.
        if reduced:
            strategy.carry_reduced_gradients(model)
        with strategy.no_sync(model, sync=i == last or sync_each):
            step_loss += run.training_step(model, batch, total)
        reduced = sync_each
        if i < last:
            run.fire("on_substep_end")
    run.sync_gradients = True
    step_loss = strategy.sum_sequence_parts(step_loss)

    grad_norm = None
    if args.max_grad_norm and args.max_grad_norm > 0:
        precision.unscale_(optimizer)
        grad_norm = strategy.clip_grad_norm(model, args.max_grad_norm)
    guard_norm = grad_norm
    if guard_norm is None and run.guard.needs_grad_norm:
        guard_norm = strategy.clip_grad_norm(model, math.inf)  # the global norm; scales by 1
    skip = run.guard.skip_update(run, step_loss, guard_norm, targets)
    run.fire("on_pre_optimizer_step")
    if not skip:
        precision.step(optimizer)
    else:
        precision.drop_step(optimizer)
    run.fire("on_optimizer_step")
    # The step log reports the rate this update used, as transformers does (read before it moves).
    learning_rate = float(optimizer.param_groups[0]["lr"])
    if not skip and not precision.step_was_skipped() and not run.scheduler_waits_for_metrics:
        run.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not skip:
        run.guard.after_update(run)
    return StepResult(step_loss, grad_norm, learning_rate, run.guard.last_skip if skip else None)
