"""Causal-LM loss from the last hidden states, in chunks of tokens: the full logits never exist.

With a large vocabulary the logits (tokens x vocab, fp32 for the softmax) and their gradient are
the biggest tensors of a step: 2 x 2048 tokens x 128k x 4 bytes is 2 GiB. `LinearCrossEntropy`
computes, per chunk of tokens, the logits, the summed loss and at once the gradients with respect
to the hidden chunk and the head's weight (and bias), keeps only those gradients, and in backward
multiplies them by the incoming scale. That is the same three matmuls the plain path does
(logits forward; hidden and weight gradients backward), with one chunk of logits alive at a time.

`chunked_loss` is what `Trainer.compute_loss` calls with `chunked_loss=True`: it runs the
transformers model's body (`base_model`), applies the head itself and normalises by the step's
target count, so the result equals the plain loss (sum over the step's targets /
`num_items_in_batch`). Where the shortcut would change the numbers (soft-capped or scaled logits,
a head that is not a plain `nn.Linear`, a model that is not a causal LM, a compiled model), it
returns None and the trainer takes the plain path, after one notice on the `ember` logger.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .loss import IGNORE_INDEX

logger = logging.getLogger("ember")

# Config fields that change the logits after the head; any of them set makes the shortcut inexact.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_logits_scale",
)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over targets of cross_entropy(hidden @ weight.T + bias, targets), computed in chunks.

    Inputs: hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) with -100 for positions
    that are not targets, chunk size in tokens, label smoothing epsilon. Returns the summed loss
    (fp32 scalar). Under autocast the matmuls run in the autocast dtype as they would in the
    plain path; the softmax and the weight-gradient accumulation run in fp32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        smoothing: float,
    ) -> torch.Tensor:
        device_type = hidden.device.type
        dtype = _matmul_dtype(hidden)
        needs_grad = ctx.needs_input_grad
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad[1] else None
            grad_bias = (
                torch.zeros_like(bias, dtype=torch.float32) if bias is not None and needs_grad[2] else None
            )
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                t = targets[start : start + chunk_size]
                loss_sum, dlogits = _chunk(h, w, b, t, smoothing, want_grads=True)
                total += loss_sum
                assert dlogits is not None
                dlogits = dlogits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = dlogits @ w
                if grad_weight is not None:
                    if dtype == torch.float32:
                        grad_weight.addmm_(dlogits.t(), h)  # in place: no (V, H) temporary
                    else:
                        grad_weight += (dlogits.t() @ h).float()
                if grad_bias is not None:
                    grad_bias += dlogits.float().sum(0)
        # Kept on ctx, not saved for backward: they are results, scaled in place once in backward.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked loss's backward ran twice: it computes its gradients once, in forward, and "
                "scales them in place; compute the loss again instead of retain_graph=True, or set "
                "chunked_loss=False."
            )
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_out.float()
        # In place: a (V, H) fp32 copy per step would be the largest allocation left.
        gh = grad_hidden.mul_(scale.to(grad_hidden.dtype)) if grad_hidden is not None else None
        gw = grad_weight.mul_(scale).to(weight_dtype) if grad_weight is not None else None
        gb = grad_bias.mul_(scale).to(bias_dtype) if grad_bias is not None else None
        return gh, gw, gb, None, None, None


def _chunk(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    t: torch.Tensor,
    smoothing: float,
    want_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of one chunk and d(loss_sum)/d(logits) (None when no gradient is wanted).

    The softmax is built in place in the fp32 logits buffer, so a chunk costs one (C, V) fp32
    tensor (plus its autocast-dtype copy under mixed precision).
    """
    logits = h @ w.t()
    if b is not None:
        logits += b
    logits = logits.float()  # a copy only under mixed precision
    valid = t != IGNORE_INDEX
    safe = t.clamp(min=0).unsqueeze(1)
    target_logit = logits.gather(1, safe).squeeze(1)
    mean_logit = logits.mean(dim=-1) if smoothing else None
    # exp(logits - max) in place: the chunk holds one (C, V) buffer (logsumexp would allocate another)
    peak = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(peak).exp_()
    total = probs.sum(dim=-1)
    lse = peak.squeeze(1) + total.log()
    per_target = lse - target_logit
    if mean_logit is not None:
        per_target = (1.0 - smoothing) * per_target + smoothing * (lse - mean_logit)
    loss_sum = torch.where(valid, per_target, 0.0).sum()
    if not want_grads:
        return loss_sum, None
    # d/dlogits of (1-e)*nll + e*mean(-log p) = softmax - (1-e)*onehot - e/V, zero where not a target;
    # the normalisation and the target mask are one row scale, applied in one pass.
    weight = valid.to(probs.dtype)
    probs *= (weight / total).unsqueeze(1)
    probs.scatter_add_(1, safe, (-(1.0 - smoothing) * weight).unsqueeze(1))
    if smoothing:
        probs -= (smoothing / probs.shape[1]) * weight.unsqueeze(1)
    return loss_sum, probs


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Sum over targets (-100 = not a target) of the cross entropy of `hidden @ weight.T + bias`.

    hidden: (..., H), targets: (...). The logits are never materialised beyond `chunk_size`
    tokens; gradients equal those of the plain computation.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(flat.device)
    params = (flat, weight) if bias is None else (flat, weight, bias)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        out: torch.Tensor = LinearCrossEntropy.apply(flat, weight, bias, flat_targets, chunk_size, smoothing)
        return out
    return _loss_only(flat, weight, bias, flat_targets, chunk_size, smoothing)


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the plain path's head matmul would run in: autocast's when it is on, else the input's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _loss_only(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int,
    smoothing: float,
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    dtype = _matmul_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        w, b = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size].to(dtype), targets[start : start + chunk_size]
            total += _chunk(h, w, b, t, smoothing, want_grads=False)[0]
    return total


# -- the trainer's entry point -------------------------------------------------------------------------

_NOTICED: set[str] = set()  # reasons warned about (chunked_loss=True)
_QUIET: set[str] = set()  # reasons logged at debug level (the default)


def notice_fallback(reason: str, explicit: bool = True) -> None:
    """Say once per reason why the chunked loss is not used (the plain loss runs instead): a warning
    when `chunked_loss=True` asked for it, a debug line when it was only the default."""
    said = _NOTICED if explicit else _QUIET
    if reason not in said:
        said.add(reason)
        if explicit:
            logger.warning("ember: chunked_loss=True but %s; using the plain loss.", reason)
        else:
            logger.debug("ember: the chunked loss does not apply (%s); using the plain loss.", reason)


def _callee(model: nn.Module) -> nn.Module:
    """The module a wrapper (DDP, DeepSpeed's engine) calls from its own forward.

    Replacing this module's forward for one call keeps the wrapper's forward in the path, so
    DDP's reducer is prepared for the backward and FSDP2's hooks gather and free parameters.
    """
    inner = getattr(model, "module", None)
    while isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, "module", None)
    return model


def why_not(model: nn.Module) -> str | None:
    """Why the chunked loss cannot reproduce this model's loss exactly, or None when it can."""
    from ..utils import base_model
    from .loss import shifts_labels

    probe: Any = model
    for _ in range(16):
        if getattr(probe, "_orig_mod", None) is not None:
            return "the model is compiled (torch.compile runs its own forward)"
        inner = getattr(probe, "module", None)
        if not isinstance(inner, nn.Module):
            break
        probe = inner
    if not shifts_labels(model):
        return f"{type(base_model(model)).__name__} is not a causal LM"
    active = getattr(_callee(model), "active_peft_config", None)
    if getattr(active, "is_prompt_learning", False):
        return "a PEFT prompt-learning adapter changes the inputs"
    hf = base_model(model)
    get_head = getattr(hf, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear:
        return f"the output head of {type(hf).__name__} is {type(head).__name__}, not a plain nn.Linear"
    if "tp" in (getattr(getattr(head.weight, "device_mesh", None), "mesh_dim_names", None) or ()):
        # Its weight is a vocabulary shard per TP rank; a vocab-parallel (loss parallel) chunked loss
        # is not implemented, so the plain loss runs on the gathered logits.
        return f"the output head of {type(hf).__name__} is split by tensor parallelism (tp_size > 1)"
    body = getattr(hf, "base_model", None)
    if not isinstance(body, nn.Module) or body is hf:
        return f"{type(hf).__name__} has no separate body (`base_model`) to run without its head"
    config = getattr(hf, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else None
    for cfg in (config, text_config):
        for name in _LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if value is not None and value != 1:
                return f"the config sets `{name}`={value!r}, which transforms the logits"
        if getattr(cfg, "output_router_logits", False):
            return "the model adds a router auxiliary loss to its loss (output_router_logits=True)"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    return None


# Per model: does its own loss equal the chunked loss on a sample (absent: not checked yet)?
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_SAMPLE_TOKENS = 128


def _agrees_with_model(
    model: nn.Module, hf: nn.Module, body: nn.Module, head: Any, inputs: dict[str, Any], extra: dict[str, Any]
) -> bool:
    """Compare, once per model, its own loss with the chunked one on a sample of the batch.

    The config checks in `why_not` know the transforms transformers has today; this catches the
    others (a logit multiplier under another name, a loss computed differently in forward). The
    sample is the first row's first tokens with every token a target, so it costs a sliver of one
    forward, holds no full logits, and never depends on the labels: every rank runs it exactly
    once, at its first chunked micro-batch, which keeps FSDP2's collectives (the calls go through
    `model`, the wrapper) in step. Eval mode: no dropout, no randomness consumed.
    """
    ids = inputs["input_ids"][:1, :_SAMPLE_TOKENS]
    if ids.shape[1] < 2:
        ids = ids.repeat(1, 2)
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    count = ids.shape[1] - 1

    def body_and_head_loss(**kwargs: Any) -> torch.Tensor:
        hidden = body(**{**extra, **kwargs})[0]
        flat = hidden.reshape(-1, hidden.shape[-1])
        return _loss_only(flat, head.weight, head.bias, targets.reshape(-1), _SAMPLE_TOKENS, 0.0) / count

    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
            own = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            with _forward_replaced(_callee(model), body_and_head_loss):
                ours = model(input_ids=ids)
    finally:
        hf.train(was_training)
    if not isinstance(own, torch.Tensor):
        return False
    rtol = 2e-2 if torch.is_autocast_enabled(ours.device.type) else 1e-4
    return bool(torch.isclose(ours.float(), own.float(), rtol=rtol, atol=1e-6))


@contextmanager
def _forward_replaced(module: nn.Module, forward: Any) -> Iterator[None]:
    module.forward = forward  # instance attribute: shadows the class's forward for this call only
    try:
        yield
    finally:
        del module.forward


def _accepts(fn: Any, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


def chunked_causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None,
    chunk_size: int,
    smoothing: float = 0.0,
    notice: bool = True,
) -> torch.Tensor | None:
    """The micro-batch's causal-LM loss (sum over targets / `num_items_in_batch`), or None.

    None means the chunked path does not apply (no integer `labels`, or `why_not` found a
    reason, noticed once): the caller computes the plain loss. `model` is what the trainer calls
    (possibly DDP/FSDP2/DeepSpeed-wrapped); its forward runs, with the wrapped model's forward
    replaced by body + chunked head for this call.
    """
    labels = inputs.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() < 2:
        return None
    reason = why_not(model)
    if reason is not None:
        notice_fallback(reason, notice)
        return None
    from ..utils import base_model

    hf = base_model(model)
    body, head = hf.base_model, hf.get_output_embeddings()
    targets = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    extra = {"use_cache": False} if _accepts(body.forward, "use_cache") else {}
    if "input_ids" in inputs and hf not in _VERIFIED:
        _VERIFIED[hf] = _agrees_with_model(model, hf, body, head, inputs, extra)
    if _VERIFIED.get(hf) is False:
        notice_fallback(
            f"{type(hf).__name__}'s own loss differs from loss(head(hidden states)) on a sample", notice
        )
        return None

    def body_and_head(**kwargs: Any) -> torch.Tensor:
        hidden = body(**{**extra, **kwargs})[0]
        return linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk_size, smoothing)

    callee = _callee(model)
    features = {k: v for k, v in inputs.items() if k != "labels"}
    with _forward_replaced(callee, body_and_head):
        loss_sum = model(**features)
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    if isinstance(count, torch.Tensor):
        count = count.to(loss_sum.device)
    return loss_sum / count
