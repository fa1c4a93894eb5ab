"""Exact loss normalisation across micro-batches.

A model's own loss is a mean over *its* targets. To make k micro-batches equal one batch k times
larger, each micro-batch's mean is turned back into a sum (times its own target count) and divided
by the target count of the whole optimizer step. Counting happens on the CPU batch before it is
moved to the device, so it never waits on the accelerator.

Causal LMs shift labels inside forward: their targets are `labels[..., 1:] != -100`. transformers
keys this on `model.loss_type`, which is None for GPT2LMHeadModel; we look at the class instead.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def shifts_labels(model: nn.Module) -> bool:
    """Whether `model` shifts `labels` by one position inside forward (a causal LM).

    A plain module can say so itself with an attribute `shifts_labels = True`.
    """
    from ..utils import base_model

    base = base_model(model)
    declared = getattr(base, "shifts_labels", None)
    if isinstance(declared, bool):
        return declared
    if getattr(base, "loss_type", None) == "ForCausalLM":
        return True
    name = type(base).__name__
    if name.endswith(_CAUSAL_SUFFIXES):
        return True
    auto = sys.modules.get("transformers.models.auto.modeling_auto")
    names = getattr(auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {}) if auto else {}
    return name in set(names.values())


def count_targets(batch: Mapping[str, Any], shift: bool = False) -> torch.Tensor:
    """How many positions of this micro-batch the model's mean loss averages over.

    `shift_labels` (targets already shifted, as transformers names them): those not equal to -100.
    Integer `labels`: the positions not equal to -100 (after the causal shift). Float labels
    (regression): every element. No `labels` key: one per sample, so the step loss is the
    sample-weighted mean of the micro-batch means.
    """
    shifted = batch.get("shift_labels")
    if isinstance(shifted, torch.Tensor):  # targets already aligned with the logits
        return (shifted != IGNORE_INDEX).sum()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point():
            return torch.tensor(labels.numel())
        if shift and labels.dim() >= 2:
            labels = labels[..., 1:]
        return (labels != IGNORE_INDEX).sum()
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return torch.tensor(value.shape[0])
    return torch.tensor(1)


def smoothed_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, epsilon: float, shift: bool
) -> torch.Tensor:
    """Sum over targets of the label-smoothed cross entropy (divide by the step's target count)."""
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    logits = logits.float()
    labels = labels.to(logits.device)
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = labels != IGNORE_INDEX
    safe = labels.clamp(min=0).unsqueeze(-1)
    nll = -log_probs.gather(-1, safe).squeeze(-1)
    uniform = -log_probs.mean(dim=-1)
    per_target = (1.0 - epsilon) * nll + epsilon * uniform
    return (per_target * mask).sum()


def loss_from_outputs(outputs: Any, inputs: dict[str, Any], label_names: list[str]) -> torch.Tensor:
    loss = None
    if isinstance(outputs, dict):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        loss = outputs[0] if outputs[0].dim() == 0 else None
    elif isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
        loss = outputs
    if loss is None:
        present = sorted(k for k in inputs if k in label_names)
        raise ValueError(
            "The model returned no loss. Likely causes: the batch has no labels (keys: "
            f"{sorted(inputs)}; label_names={label_names}, labels found={present}); labels under another "
            "name (set `label_names`); or a model that computes no loss (override `compute_loss` or pass "
            "`compute_loss_func`)."
        )
    return loss


def logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, dict):
        return outputs["logits"]
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs
