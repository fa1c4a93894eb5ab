"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): uniform noise
of magnitude alpha / sqrt(seq_len * hidden) added to the input embeddings while training.

The noise is drawn from torch's global generator, which ember seeds and stores in every checkpoint,
so a run with noise is reproducible under its seed and resumes bit-exactly. It is added only while
the embedding module is in training mode (never in evaluate/predict) and only between the start and
the end of `train()`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..utils import base_model


def input_embeddings(model: nn.Module) -> nn.Module:
    """The module that maps token ids to vectors: `get_input_embeddings()` of the (PEFT) base model."""
    get = getattr(base_model(model), "get_input_embeddings", None)
    found = get() if callable(get) else None
    if not isinstance(found, nn.Module):
        raise ValueError(
            f"neftune_noise_alpha needs the model's input embeddings, but {type(model).__name__} has no "
            "get_input_embeddings(); add one that returns its nn.Embedding, or unset neftune_noise_alpha."
        )
    return found


def _noise_hook(alpha: float) -> Any:
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or output.dim() < 3:
            return None
        magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)

    return hook


@contextlib.contextmanager
def neftune_noise(model: nn.Module, alpha: float | None) -> Iterator[None]:
    """Add NEFTune noise to `model`'s input embeddings inside the block; nothing when alpha is None."""
    if alpha is None:
        yield
        return
    handle = input_embeddings(model).register_forward_hook(_noise_hook(float(alpha)))
    try:
        yield
    finally:
        handle.remove()
