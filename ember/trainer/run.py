"""`Run`: everything one `train()` call owns, built at its start and kept until the next one.

Before, these parts were eleven attributes set on the Trainer in four places; here they are one
object, so what a run is (its plan, its position, its guard, its clocks) reads in one place and a
second `train()` call starts from a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine.guards import StepGuard
    from ..engine.micro_batches import MicroBatchSplit
    from ..engine.run_position import RunProgress, TrainPlan
    from ..engine.step import StepContext, StepResult
    from ..telemetry.memory import MemoryTracker
    from ..telemetry.throughput import Throughput


@dataclass
class Run:
    """One training run: its length, the step's parts, and what it measures about itself."""

    plan: TrainPlan
    step_parts: StepContext
    batch_split: MicroBatchSplit
    throughput: Throughput
    memory: MemoryTracker
    start_time: float
    #: The rate the last step's update used (the step log reports it, as transformers does).
    learning_rate: float = 0.0

    @property
    def progress(self) -> RunProgress:
        return self.step_parts.progress

    @property
    def guard(self) -> StepGuard:
        return self.step_parts.guard

    def optimizer_step(self, micro_batches: list[dict[str, Any]]) -> StepResult:
        """One optimizer step; through the out-of-memory retry only when auto_find_batch_size is on."""
        from ..engine.step import run_optimizer_step

        if self.batch_split.enabled:
            return self.batch_split.run_step(self.step_parts, micro_batches)
        return run_optimizer_step(self.step_parts, micro_batches)
