"""torch_empty_cache_steps: give the device's cached, unused blocks back every N optimizer steps, which
can avoid fragmentation OOMs at some speed cost (as transformers)."""

from __future__ import annotations

from typing import Any

from .events import TrainerCallback


def empty_device_cache() -> None:
    import torch  # not at import: `import ember.cli` stays light

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()


class EmptyCacheCallback(TrainerCallback):
    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0:
            empty_device_cache()
