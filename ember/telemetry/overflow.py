"""`debug="underflow_overflow"`: find the first module whose weights or output hold inf/nan.

A forward hook on every module records one frame per call: the module's path and class, and the
abs-min/abs-max of its own weights, its inputs and its outputs. The last `max_frames` frames are
kept; when a weight, input or output of a call holds inf or nan, training stops with
`UnderflowOverflowError`, which names the module, the tensor and the step, and carries the frames
that led there (the same picture transformers' DebugUnderflowOverflow prints: an abs-max growing
towards the dtype's limit a few modules earlier, or an abs-min collapsing to 0).

Every hook reads values back from the device, so this is a debugging mode; with `debug` empty no
hook is registered and nothing runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("ember")

MAX_FRAMES = 21


class UnderflowOverflowError(ValueError):
    """inf/nan in a module's weights, inputs or outputs (a ValueError, as transformers raises)."""

    def __init__(self, message: str, module: str, tensor: str, step: int, frames: list[str]) -> None:
        super().__init__(message)
        self.module, self.tensor, self.step, self.frames = module, tensor, step, frames


def _tensors(value: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(label, leaf) pairs of a module's inputs/outputs: tensors, None, and nested tuples/lists/dicts
    (model outputs are dict-like)."""
    if isinstance(value, torch.Tensor) or value is None:
        yield name, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}[{key!r}]")
    else:
        yield name, value


def _line(label: str, value: Any) -> tuple[str, bool]:
    """One frame line and whether the value holds inf/nan."""
    if value is None:
        return f"{'None':>21} {label}", False
    if not isinstance(value, torch.Tensor):
        return f"{'not a tensor':>21} {label}", False
    if value.numel() == 0 or not (value.is_floating_point() or value.is_complex()):
        return f"{'-':>10} {'-':>10} {label} ({value.dtype})", False
    with torch.no_grad():
        data = value.detach().abs().float()
        low, high = float(data.min()), float(data.max())
        bad = not bool(torch.isfinite(data).all())
    note = "  <- inf/nan" if bad else ""
    return f"{low:10.2e} {high:10.2e} {label}{note}", bad


class UnderflowOverflowDetector:
    """Hooks on every module of `model`; `step()` says which optimizer step the forward belongs to."""

    def __init__(self, model: nn.Module, step: Callable[[], int], max_frames: int = MAX_FRAMES) -> None:
        self.step, self.model = step, model
        self.frames: deque[str] = deque(maxlen=max_frames)
        # Shared modules are reported under their first name, as named_modules() lists them.
        self.names = {module: name or "(model)" for name, module in model.named_modules()}
        self.handles = [m.register_forward_hook(self._hook) for m in self.names]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        path = self.names.get(module, type(module).__name__)
        lines = [f"{path} ({type(module).__name__})"]
        culprit = None
        parts: list[tuple[str, Any]] = list(module.named_parameters(recurse=False))
        parts += list(_tensors(inputs, "input"))
        parts += list(_tensors(output, "output"))
        for label, value in parts:
            line, bad = _line(label, value)
            lines.append(line)
            if bad and culprit is None:
                culprit = label
        self.frames.append("\n".join(lines))
        if culprit is not None:
            self._stop(path, type(module).__name__, culprit)

    def _stop(self, path: str, cls: str, tensor: str) -> None:
        step = self.step()
        # Evaluation during training runs with the model in eval mode, after the steps so far.
        where = f"step {step}" if self.model.training else f"an evaluation after step {step - 1}"
        frames = list(self.frames)
        self.frames.clear()
        header = f"{'abs min':>10} {'abs max':>10} tensor"
        report = "\n\n".join(frames)
        logger.error(
            "debug=underflow_overflow: the last %d forward frames:\n%s\n%s", len(frames), header, report
        )
        raise UnderflowOverflowError(
            f"debug='underflow_overflow': inf/nan in `{tensor}` of module `{path}` ({cls}) in {where}; "
            f"training stopped. The last {len(frames)} forward frames (abs min, abs max per tensor), "
            f"oldest first:\n{header}\n{report}",
            module=path,
            tensor=tensor,
            step=step,
            frames=frames,
        )


@contextlib.contextmanager
def watch_underflow_overflow(
    model: nn.Module, debug: list[str] | str, step: Callable[[], int]
) -> Iterator[UnderflowOverflowDetector | None]:
    """The detector while the body runs when `debug` asks for it; otherwise nothing at all."""
    if "underflow_overflow" not in debug:
        yield None
        return
    detector = UnderflowOverflowDetector(model, step)
    try:
        yield detector
    finally:
        detector.remove()
