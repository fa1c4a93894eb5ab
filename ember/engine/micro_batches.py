"""auto_find_batch_size: on an out-of-memory error, retry the step with micro-batches half as large
and twice as many of them.

transformers restarts training with a smaller `per_device_train_batch_size`, which changes the global
batch and so the run's maths (learning-rate/batch ratio, steps per epoch). ember keeps the global
batch: each loaded batch is split into `split` micro-batches (the same samples, in the same order),
which is the same as halving the batch and doubling the accumulation steps. With ember's exact
loss normalisation (by the step's target count) the loss and the update are those of the original
batch, and the run equals one started with the smaller micro-batch.

The failed attempt is undone before the retry: gradients are dropped, and the random state is put
back as it was at the start of the step, so dropout draws what it would have drawn. The found
`split` is part of the checkpoint: a resumed run starts with it instead of hitting the error again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import step as loop

if TYPE_CHECKING:
    from .step import StepHost, StepResult

logger = logging.getLogger("ember")

# The CPU allocator's words, and what older torch and some kernels raise as a plain RuntimeError
# on an accelerator ("CUDA out of memory.", "CUDA error: out of memory", cuDNN's refusal to run).
_OOM_MESSAGES = ("can't allocate memory", "not enough memory", "out of memory", "CUDNN_STATUS_NOT_SUPPORTED")


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), and the RuntimeErrors the CPU allocator raises."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES)


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """`batch` cut along its first dimension into up to `parts` consecutive, non-empty pieces."""
    size = _batch_size(batch)
    if parts <= 1 or size is None:
        return [batch]
    pieces: list[dict[str, Any]] = [{} for _ in range(min(parts, size))]
    bounds = [round(i * size / len(pieces)) for i in range(len(pieces) + 1)]
    for key, value in batch.items():
        for i, piece in enumerate(pieces):
            if isinstance(value, torch.Tensor | list | tuple) and len(value) == size:
                piece[key] = value[bounds[i] : bounds[i + 1]]
            else:
                piece[key] = value
    return pieces


def _batch_size(batch: dict[str, Any]) -> int | None:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


class MicroBatchSplit:
    """How many micro-batches each loaded batch is cut into (1 until an out-of-memory error)."""

    def __init__(self, enabled: bool, per_device_batch: int) -> None:
        self.enabled = enabled
        self.per_device_batch = per_device_batch
        self.split = 1

    @property
    def micro_batch_size(self) -> int:
        return -(-self.per_device_batch // self.split)

    def state_dict(self) -> dict[str, int]:
        return {"split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.split = int(state.get("split", 1))

    def run_step(self, host: StepHost, model: nn.Module, micro_batches: list[dict[str, Any]]) -> StepResult:
        """`loop.run_optimizer_step`, retried with smaller micro-batches on out-of-memory errors."""
        if not self.enabled:
            return loop.run_optimizer_step(host, model, micro_batches)
        from ..checkpoint.rng import capture_rng_state, restore_rng_state

        rng = capture_rng_state()
        while True:
            pieces = [p for b in micro_batches for p in split_batch(b, self.split)]
            try:
                return loop.run_optimizer_step(host, model, pieces)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                if self.micro_batch_size <= 1:
                    raise RuntimeError(
                        "auto_find_batch_size: out of memory even with micro-batches of 1 sample; use a "
                        "smaller model or sequence length, activation_checkpointing=True, or a device with "
                        "more memory."
                    ) from error
            # Out of the except block, so the failed attempt's frames (and their activations) are freed.
            self._shrink(host)
            restore_rng_state(rng)

    def shrink_after_step(self, host: StepHost, error: BaseException) -> bool:
        """An out-of-memory error raised after the step's update (a callback's memory check, as
        transformers' tests raise it in on_step_end): the update stands, and the following steps
        use micro-batches half as large. False when this is not an error to shrink for."""
        if not self.enabled or not is_out_of_memory(error) or self.micro_batch_size <= 1:
            return False
        self._shrink(host)
        return True

    def _shrink(self, host: StepHost) -> None:
        assert host.optimizer is not None
        host.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.split *= 2
        host.state.train_batch_size = self.micro_batch_size
        logger.warning(
            "auto_find_batch_size: out of memory; retrying the step with micro-batches of %d "
            "(%d per loaded batch of %d). The global batch and the loss are unchanged.",
            self.micro_batch_size,
            self.split,
            self.per_device_batch,
        )
