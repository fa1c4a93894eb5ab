"""One optimizer step: micro-batches, exact loss normalisation, backward, clip, step.

Kept apart from the trainer so the hot path is small enough to read in one sitting and to profile
on its own. Everything here runs once per optimizer step; nothing calls `.item()`, so the host
never waits for the device inside a step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..data.checks import check_step_batches
from .loss import count_targets

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..callbacks.state import TrainerControl, TrainerState
    from ..strategy.base import Strategy
    from .guards import StepGuard
    from .run_position import RunProgress


class StepHost(Protocol):
    """What one optimizer step needs from its owner (the Trainer is one)."""

    args: TrainingArguments
    state: TrainerState
    control: TrainerControl
    strategy: Strategy
    optimizer: torch.optim.Optimizer | None
    lr_scheduler: Any
    label_shift: bool
    step_guard: StepGuard
    model_wrapped: nn.Module
    _progress: RunProgress
    #: False while a micro-batch's gradients stay local (all but the last of a step): what
    #: `accelerator.sync_gradients` reports to a custom training_step.
    _sync_gradients: bool

    @property
    def scheduler_waits_for_metrics(self) -> bool: ...

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def _fire(self, event: str, **kwargs: Any) -> None: ...


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


def run_optimizer_step(host: StepHost, model: nn.Module, micro_batches: list[dict[str, Any]]) -> StepResult:
    """Forward/backward every micro-batch, then clip, step the optimizer and the scheduler.

    The step loss is the mean over all targets of the step on all ranks, the same number one
    big batch would give.
    """
    strategy = host.strategy
    precision = strategy.precision
    args = host.args
    check_step_batches(host, model, micro_batches)
    counts = [count_targets(b, host.label_shift) for b in micro_batches]
    local = torch.stack(counts).sum()
    total = strategy.all_reduce_sum(local.to(strategy.device, non_blocking=True))
    if host.step_guard.is_empty_step(host, local):
        assert host.optimizer is not None, "train() builds the optimizer before the first step"
        learning_rate = float(host.optimizer.param_groups[0]["lr"])
        return StepResult(torch.zeros((), device=strategy.device), None, learning_rate, skipped="empty")
    targets, total = total, total.clamp(min=1)
    step_loss = torch.zeros((), device=strategy.device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        # A micro-batch with no target contributes nothing; its mean loss would be 0/0 = nan.
        if i < last and int(counts[i]) == 0:
            host._fire("on_substep_end")
            continue
        host._sync_gradients = i == last
        with strategy.no_sync(model, sync=i == last):
            step_loss += host.training_step(model, batch, total)
        if i < last:
            host._fire("on_substep_end")

    host._sync_gradients = True
    optimizer = host.optimizer
    assert optimizer is not None, "train() builds the optimizer before the first step"
    grad_norm = None
    if args.max_grad_norm and args.max_grad_norm > 0:
        precision.unscale_(optimizer)
        grad_norm = strategy.clip_grad_norm(model, args.max_grad_norm)
    guard_norm = grad_norm
    if guard_norm is None and host.step_guard.needs_grad_norm:
        guard_norm = strategy.clip_grad_norm(model, math.inf)  # the global norm; scales by 1
    skip = host.step_guard.skip_update(host, step_loss, guard_norm, targets)
    host._fire("on_pre_optimizer_step")
    if not skip:
        precision.step(optimizer)
    else:
        precision.drop_step(optimizer)
    host._fire("on_optimizer_step")
    # The step log reports the rate this update used, as transformers does (read before it moves).
    learning_rate = float(optimizer.param_groups[0]["lr"])
    if not skip and not precision.step_was_skipped() and not host.scheduler_waits_for_metrics:
        host.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not skip:
        host.step_guard.after_update(host)
    return StepResult(step_loss, grad_norm, learning_rate, host.step_guard.last_skip if skip else None)
