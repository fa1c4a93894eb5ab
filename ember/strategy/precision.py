"""Precision objects: autocast, loss scaling and their state, so the loop never asks which dtype runs.

`Precision` is the interface; `FullPrecision` does nothing; `Bf16Precision` autocasts (CPU or
CUDA); `Fp16Precision` autocasts and scales the loss with a GradScaler (CUDA only). Each has
`state_dict`/`load_state_dict` so the scaler survives a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments


class Precision:
    """The interface, and fp32 (or whatever dtype the model has): every hook is a no-op.

    `dtype` is the compute dtype of autocast (None: none); the strategies derive their own
    settings from it (FSDP's MixedPrecisionPolicy, DeepSpeed's bf16 section), so the precision is
    decided once, here.
    """

    name = "fp32"
    dtype: torch.dtype | None = None
    #: Whether this precision skips steps with non-finite gradients itself (the step guard then does not).
    skips_nonfinite_steps = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def step_was_skipped(self) -> bool:
        return False

    def drop_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step guard kept this step's update from happening."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FullPrecision(Precision):
    """fp32: the model's own dtype, no autocast, no scaling."""


class Bf16Precision(Precision):
    """bf16 autocast: same range as fp32, so no loss scaling is needed."""

    name = "bf16"
    dtype = torch.bfloat16

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            yield


class Fp16Precision(Precision):
    """fp16 autocast with dynamic loss scaling; a step whose gradients overflowed is skipped."""

    name = "fp16"
    dtype = torch.float16
    skips_nonfinite_steps = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.scaler = torch.amp.GradScaler(device.type)
        self._scale_before = 0.0

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(device_type=self.device.type, dtype=torch.float16):
            yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        # A subclass's training_step may clip (accelerator.clip_grad_norm_) before the step clips;
        # GradScaler refuses a second unscale_ in one step, and the gradients are unscaled already.
        state = self.scaler._per_optimizer_states.get(id(optimizer))
        if state is not None and state["stage"] is torch.amp.grad_scaler.OptState.UNSCALED:
            return
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self._scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()

    def drop_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After unscale_, GradScaler refuses a second unscale_ until update(); its inf checks are
        # recorded, so update() can close the step (lowering the scale if they found an overflow).
        if any(s["found_inf_per_device"] for s in self.scaler._per_optimizer_states.values()):
            self.scaler.update()

    def step_was_skipped(self) -> bool:
        # GradScaler lowers its scale exactly when it skipped the step for inf/nan gradients.
        return self.scaler.get_scale() < self._scale_before

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scaler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


def build_precision(args: TrainingArguments, device: torch.device) -> Precision:
    """The precision object for `args.bf16` / `args.fp16`, and tf32 switched on or off as asked."""
    if args.tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    if args.fp16:
        return Fp16Precision(device)
    if args.bf16:
        return Bf16Precision(device)
    return FullPrecision(device)
