"""Step guards: what an optimizer step with non-finite gradients, or with a spiking loss, does.

One bad step is enough to ruin a run: a NaN gradient turns every weight it touches into NaN
through the optimizer, and a loss spike (a corrupt batch, an unstable update) can throw the
model far from where it was. The guard looks at each step after backward and clipping, before
the optimizer moves, and may keep the update from happening.

Non-finite steps (`nonfinite_step_policy`):
- "skip" (default): no optimizer update, optimizer state untouched, the scheduler does not step
  (as transformers does with a step its GradScaler skipped), the step is counted and warned
  about; `max_consecutive_nonfinite_steps` skips in a row raise `NonFiniteStepError`.
- "stop": raise `NonFiniteStepError` at the first one.
- "ignore": update anyway, as transformers does.

The test is on the global gradient norm only (one `isfinite` on a scalar, the only host sync of
the step): after the gradient all-reduce of DDP, or the global norm of FSDP, it is the same
number on every rank, so every rank takes the same decision without another collective. A NaN
or inf loss gives non-finite gradients through backward, so it is caught the same way. With fp16
the GradScaler already skips steps whose gradients overflowed; the guard leaves those to it and
counts nothing, so no step is counted twice.

Loss spikes (`loss_spike_zscore`, opt-in): once `loss_spike_window` steps have been seen, a step
whose loss (global across ranks) is more than z standard deviations above the mean of the last
`loss_spike_window` step losses is not applied, and the model, optimizer, scheduler and RNG are
rolled back to the in-memory copy taken every `loss_spike_window` good steps. The strategy takes
and restores that copy (`snapshot_for_rollback` / `restore_rollback`), each rank its own shards or
partition; a strategy that cannot says so when the Trainer is built (`rollback_refusal`). The data position
keeps moving forward, so the spiking batches are never seen again (nor after a resume); the steps
since the copy count as done but leave no trace in the weights. Each rollback is logged and
recorded (epoch, step in epoch) in the guard's state, which checkpoints carry.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..args.names import NONFINITE_POLICIES

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments
    from ..callbacks.state import TrainerState
    from ..strategy.base import Strategy
    from ..strategy.rollback import RollbackParts, RollbackSnapshot
    from .run_position import RunProgress

logger = logging.getLogger("ember")

__all__ = ["NONFINITE_POLICIES", "GuardHost", "NonFiniteStepError", "SpikeGuard", "StepGuard"]


class GuardHost(Protocol):
    """What the guard reads and rolls back (`engine.step.StepContext` is one): the parts a step moves."""

    args: TrainingArguments
    state: TrainerState
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    model_wrapped: nn.Module
    progress: RunProgress


class NonFiniteStepError(RuntimeError):
    """Training stopped because of steps whose gradients were NaN or inf."""


class StepGuard:
    """Decides, once per optimizer step, whether the update may be applied; a `state_dict()` part."""

    def __init__(
        self, args: TrainingArguments, precision_skips_nonfinite: bool, grad_norm_before_step: bool
    ) -> None:
        self.policy: str = args.nonfinite_step_policy
        self.max_consecutive: int = args.max_consecutive_nonfinite_steps
        # fp16's GradScaler owns its overflow skips; a strategy whose norm only exists after its
        # own step (DeepSpeed ZeRO) leaves nothing to test beforehand.
        self.checks_nonfinite = (
            self.policy != "ignore" and not precision_skips_nonfinite and grad_norm_before_step
        )
        self.nonfinite_steps = 0
        self.consecutive = 0
        self.empty_steps = 0
        # Why the last step's update was not applied ('nonfinite', 'empty', 'spike'), or None.
        self.last_skip: str | None = None
        self.spikes: SpikeGuard | None = None
        if args.loss_spike_zscore is not None:
            self.spikes = SpikeGuard(args.loss_spike_zscore, args.loss_spike_window)

    @property
    def needs_grad_norm(self) -> bool:
        return self.checks_nonfinite

    def is_empty_step(self, host: GuardHost, local_targets: torch.Tensor) -> bool:
        """One process: True when no micro-batch of this step has a target (all labels -100).

        Such a step has no loss to learn from, but an update would still move the weights
        (momentum, weight decay), so it is skipped whole and counted; it has no loss, so none is
        logged or averaged for it (its log entry counts it in `skipped_steps`). The count
        is on the host, so this costs no sync. With several processes the step runs (each
        micro-batch without targets adds 0) and `skip_update` tests the all-reduced count together
        with the gradient norm, in the step's one sync.
        """
        self.last_skip = None
        if host.strategy.world_size > 1 or int(local_targets) > 0:
            return False
        self._on_empty(host)
        self.last_skip = "empty"
        return True

    def skip_update(
        self,
        host: GuardHost,
        step_loss: torch.Tensor,
        grad_norm: torch.Tensor | None,
        total_targets: torch.Tensor | None = None,
    ) -> bool:
        """True when this step's update must not be applied (the caller then zeroes the gradients).

        `total_targets`: the step's target count on all ranks (before clamping).
        """
        self.last_skip = None
        tests: list[torch.Tensor] = []
        if self.checks_nonfinite and grad_norm is not None:
            tests.append(torch.isfinite(grad_norm))
        has_targets = None
        if total_targets is not None and host.strategy.world_size > 1:
            has_targets = torch.gt(total_targets, 0)
            tests.append(has_targets)
        if tests and not bool(tests[0] if len(tests) == 1 else tests[0] & tests[1]):  # the one sync
            if has_targets is not None and not bool(has_targets):
                self._on_empty(host)
                self.last_skip = "empty"
                return True
            self._on_nonfinite(host, float(grad_norm) if grad_norm is not None else math.nan)
            self.last_skip = "nonfinite"
            return True
        self.consecutive = 0
        if self.spikes is not None:
            loss = float(host.strategy.all_reduce_sum(step_loss.detach().clone()))
            if self.spikes.is_spike(loss):
                self.spikes.roll_back(host, loss)
                self.last_skip = "spike"
                return True
        return False

    def counts(self) -> dict[str, float]:
        """The guard's counters for the step log, once they are not zero."""
        named = {"nonfinite_steps": self.nonfinite_steps, "empty_steps": self.empty_steps}
        return {k: float(v) for k, v in named.items() if v}

    def after_update(self, host: GuardHost) -> None:
        if self.spikes is not None:
            self.spikes.maybe_keep_copy(host)

    def _on_empty(self, host: GuardHost) -> None:
        self.empty_steps += 1
        logger.warning(
            "ember: no targets at %s (every label is -100): the step is skipped (%d such steps so far).",
            describe_step(host),
            self.empty_steps,
        )

    def _on_nonfinite(self, host: GuardHost, norm: float) -> None:
        self.nonfinite_steps += 1
        self.consecutive += 1
        where = describe_step(host)
        if self.policy == "stop":
            raise NonFiniteStepError(
                f"The gradient norm is {norm} at {where}. Find the batch (NaN/inf inputs or labels, a "
                "too high learning_rate), or set nonfinite_step_policy='skip' to skip such steps."
            )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteStepError(
                f"{self.consecutive} optimizer steps in a row had a non-finite gradient norm (the last "
                f"at {where}); the model or the data is broken, not one batch. Lower learning_rate or "
                "check the data; raise max_consecutive_nonfinite_steps to tolerate longer runs of them."
            )
        logger.warning(
            "ember: skipped the optimizer update at %s: gradient norm is %s (%d non-finite steps so far).",
            where,
            norm,
            self.nonfinite_steps,
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive": self.consecutive,
            "empty_steps": self.empty_steps,
        }
        if self.spikes is not None:
            state["spikes"] = self.spikes.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.empty_steps = int(state.get("empty_steps", 0))
        if self.spikes is not None and state.get("spikes"):
            self.spikes.load_state_dict(state["spikes"])


def describe_step(host: GuardHost) -> str:
    """'step S (epoch E, micro-batches A-B of the epoch)', for the step about to be applied."""
    ga = host.args.gradient_accumulation_steps
    epoch, in_epoch = host.progress.epoch, host.progress.step_in_epoch
    first = in_epoch * ga
    return (
        f"step {host.state.global_step + 1} (epoch {epoch}, micro-batches {first}-{first + ga - 1} "
        "of the epoch)"
    )


class SpikeGuard:
    """Running loss statistics over a window, and the last good copy of the training state."""

    def __init__(self, zscore: float, window: int) -> None:
        self.zscore, self.window = zscore, window
        self.losses: deque[float] = deque(maxlen=window)
        self.rollbacks: list[list[int]] = []
        self._good_steps = 0
        self._copy: RollbackSnapshot | None = None
        self._copy_step = 0

    def is_spike(self, loss: float) -> bool:
        if len(self.losses) < self.window:
            if math.isfinite(loss):
                self.losses.append(loss)
            return False
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        # A window of identical losses has std 0: any rise would be an infinite z-score; a relative
        # floor keeps a flat loss from treating rounding noise as a spike.
        std = max(std, 1e-6 * max(abs(mean), 1.0))
        if loss > mean + self.zscore * std or not math.isfinite(loss):
            self._last_stats = (mean, std)
            return True
        self.losses.append(loss)
        return False

    def maybe_keep_copy(self, host: GuardHost) -> None:
        self._good_steps += 1
        if self._copy is None or self._good_steps % self.window == 0:
            self._copy = host.strategy.snapshot_for_rollback(_rollback_parts(host))
            self._copy_step = host.state.global_step + 1  # the update just applied

    def roll_back(self, host: GuardHost, loss: float) -> None:
        mean, std = self._last_stats
        where = describe_step(host)
        self.rollbacks.append([host.progress.epoch, host.progress.step_in_epoch])
        if self._copy is not None:
            host.strategy.restore_rollback(_rollback_parts(host), self._copy)
        logger.warning(
            "ember: loss spike at %s: %.6g is more than %g standard deviations above the mean %.6g "
            "(std %.3g) of the last %d steps; its update is dropped and the model, optimizer, scheduler "
            "and RNG are rolled back to their state after step %d (rollback %d).",
            where,
            loss,
            self.zscore,
            mean,
            std,
            len(self.losses),
            self._copy_step,
            len(self.rollbacks),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "rollbacks": [list(r) for r in self.rollbacks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque((float(x) for x in state.get("losses", [])), maxlen=self.window)
        self.rollbacks = [[int(a), int(b)] for a, b in state.get("rollbacks", [])]


def _rollback_parts(host: GuardHost) -> RollbackParts:
    from ..checkpoint.rng import RngState
    from ..strategy.rollback import RollbackParts

    return RollbackParts(
        model=host.model_wrapped,
        optimizer=host.optimizer,
        scheduler=host.lr_scheduler,
        precision=host.strategy.precision,
        rng=RngState(),
    )
