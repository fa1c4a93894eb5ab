"""Capture and restore every random number generator a training step can draw from.

The captured dict holds only tuples, ints, floats, numpy arrays and uint8 tensors, so
`state_io.save_state` stores it without pickle.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU, and (when in use) each CUDA device's and the MPS generator state."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
    }
    # An uninitialised CUDA runtime has drawn nothing yet: its state is whatever the seed queued,
    # which a resumed run re-creates by seeding, so there is no need to start CUDA just to read it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned (possibly after a save/load round-trip)."""
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(_as_tuple(state["numpy"]))
    torch.set_rng_state(state["cpu"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            logger.warning(
                "The checkpoint holds CUDA random states but CUDA is not available; skipping them."
            )
        else:
            count = torch.cuda.device_count()
            if count != len(cuda_states):
                logger.warning(
                    "The checkpoint holds random states for %d CUDA devices but %d are visible; "
                    "restoring the first %d.",
                    len(cuda_states),
                    count,
                    min(count, len(cuda_states)),
                )
            for i, device_state in enumerate(cuda_states[:count]):
                torch.cuda.set_rng_state(device_state.cpu(), i)
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"].cpu())


class RngState:
    """The process's random generators as a stateful part (each rank saves its own)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)


def _as_tuple(value: Any) -> Any:
    """random/numpy want tuples all the way down; a JSON round-trip elsewhere may have made lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
