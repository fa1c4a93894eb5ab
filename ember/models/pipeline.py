"""The model pipeline: one function, `prepare_model`, called once per `train()` before the strategy
places and wraps the model. In this order:

1. adapters already on the model (PEFT) are kept; a quantized base without adapters is refused;
   Liger's kernels are patched in where they run (`use_liger_kernel`, models/liger.py);
2. activation checkpointing (a transformers model's own, or per block for a plain module);
3. `torch.compile` (in place, so parameter names, checkpoints and `save_model` keep the original
   names: no `_orig_mod.` prefix);
4. sharding / DDP wrapping stays in the strategy (`strategy.setup_model`).

Every step is idempotent: a second `train()` on the same model changes nothing.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch
from torch import nn

from ..checkpoint.model import is_peft_model
from ..utils import base_model

logger = logging.getLogger("ember")

#: Keys of `activation_checkpointing_kwargs` that ember (as transformers 5.24) reads itself; the rest
#: go to `torch.utils.checkpoint.checkpoint`.
OWN_CHECKPOINT_KEYS = ("every_n_layers", "offload")
_CHECKPOINTED = "_ember_checkpointed"


def prepare_model(model: nn.Module, args: Any) -> nn.Module:
    """Apply the pipeline steps the arguments ask for to `model` (in place) and return it."""
    check_quantized(model)
    if args.use_liger_kernel:
        from .liger import apply_liger, liger_reason

        if liger_reason(model) is None:  # elsewhere the Trainer said why, and chunks the loss
            apply_liger(model, args.liger_kernel_config)
    if args.activation_checkpointing:
        enable_activation_checkpointing(model, args.activation_checkpointing_kwargs)
    if args.torch_compile:
        compile_model(model, args.torch_compile_backend, args.torch_compile_mode)
    return model


# -- adapters and quantized bases ------------------------------------------------------------------


def check_quantized(model: nn.Module) -> None:
    """A quantized base (bitsandbytes 4/8-bit, torchao, quanto, ...) trains only through adapters,
    as in transformers: its quantized weights have no gradient an optimizer could apply."""
    if not getattr(model, "is_quantized", False) or is_peft_model(model):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "is_qat_trainable", False):
        return  # quantization-aware training: the quantizer trains the weights itself
    method = getattr(model, "quantization_method", None) or "an unknown method"
    method = getattr(method, "value", method)
    if quantizer is not None and not getattr(quantizer, "is_trainable", True):
        raise ValueError(
            f"The model is quantized with {method}, which does not support training; load it with a "
            "trainable method (bitsandbytes, torchao, quanto) or unquantized."
        )
    raise ValueError(
        f"The model is quantized ({method}) and has no adapters: its quantized weights cannot be trained. "
        "Add trainable adapters first, e.g. model = peft.get_peft_model(model, peft.LoraConfig(...)) "
        "(with peft.prepare_model_for_kbit_training for 4/8-bit), then pass that model to the Trainer."
    )


def label_smoothing_for(model: nn.Module, factor: float) -> float:
    """The label smoothing to apply: none for multi-label classification, as transformers (its labels
    are independent 0/1 targets of a BCE loss, which smoothing over classes does not fit)."""
    config = getattr(base_model(model), "config", None)
    if factor > 0 and getattr(config, "problem_type", None) == "multi_label_classification":
        # A UserWarning, as transformers gives it (its tests and users filter it as one).
        warnings.warn(
            f"label_smoothing_factor={factor} is ignored: the model is a multi-label classifier "
            "(config.problem_type='multi_label_classification'), whose loss smoothing does not apply to.",
            UserWarning,
            stacklevel=3,
        )
        return 0.0
    return factor


# -- compile ---------------------------------------------------------------------------------------


def compile_model(model: nn.Module, backend: str | None = None, mode: str | None = None) -> None:
    """`torch.compile` the model's forward in place (`nn.Module.compile`).

    In place rather than `torch.compile(model)`: the module stays the user's object, so parameter
    names, state dicts, checkpoints and `save_model` carry no `_orig_mod.` prefix, and the loss
    (computed by the Trainer outside the forward) keeps its exact token normalisation.
    """
    if getattr(model, "_compiled_call_impl", None) is not None:
        return
    kwargs: dict[str, Any] = {"backend": backend or "inductor"}
    if mode is not None:
        kwargs["mode"] = mode
    model.compile(**kwargs)


# -- activation checkpointing ------------------------------------------------------------------------


def enable_activation_checkpointing(
    model: nn.Module, kwargs: dict[str, Any] | None = None, blocks: list[nn.Module] | None = None
) -> None:
    """Recompute activations in backward instead of storing them.

    transformers models use their own switch (`activation_checkpointing_enable`, or
    `gradient_checkpointing_enable` before 5.x), which keeps parameter names and turns on input
    gradients for adapters. Other modules get each of `blocks` (default: the children of their
    largest `nn.ModuleList`) run under `torch.utils.checkpoint`. `kwargs` as transformers 5.24:
    `every_n_layers`, `offload`, and the rest for `torch.utils.checkpoint.checkpoint`
    (`use_reentrant` defaults to False).
    """
    options = dict(kwargs or {})
    every_n = int(options.pop("every_n_layers", 1))
    offload = bool(options.pop("offload", False))
    options.setdefault("use_reentrant", False)
    target = model.get_base_model() if is_peft_model(model) else model  # type: ignore[operator]
    if _enable_transformers(target, options, every_n, offload):
        return
    chosen = blocks if blocks is not None else repeated_blocks(target)
    if not chosen:
        raise ValueError(
            f"activation_checkpointing: {type(target).__name__} has no repeated blocks (no nn.ModuleList) "
            "and no gradient_checkpointing_enable(); give it one, or turn activation_checkpointing off."
        )
    for i, block in enumerate(chosen):
        if i % every_n == 0:
            _checkpoint_forward(block, options, offload)
    if is_peft_model(model) and options["use_reentrant"]:
        # Reentrant checkpointing gives no parameter gradients when no input requires grad, which is
        # the case under frozen embeddings; make the first block's inputs require grad.
        chosen[0].register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)


def _enable_transformers(model: nn.Module, options: dict[str, Any], every_n: int, offload: bool) -> bool:
    extra: dict[str, Any] = {}
    if every_n != 1:
        extra["every_n_layers"] = every_n
    if offload:
        extra["offload"] = True
    new = getattr(model, "activation_checkpointing_enable", None)
    if callable(new):
        new(activation_checkpointing_kwargs=options, **extra)
        return True
    old = getattr(model, "gradient_checkpointing_enable", None)
    if callable(old):
        old(gradient_checkpointing_kwargs=options, **extra)
        return True
    return False


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the largest `nn.ModuleList` (by parameter count): a model's layer stack."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    return list(largest) if largest is not None else []


def _checkpoint_forward(block: nn.Module, options: dict[str, Any], offload: bool) -> None:
    """Run `block.forward` under torch.utils.checkpoint while training; names stay unchanged."""
    if getattr(block, _CHECKPOINTED, False):
        return
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        # Keyword inputs ride in a partial: reentrant checkpointing takes positional inputs only.
        run = functools.partial(forward, **kwargs) if kwargs else forward
        if offload:
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return checkpoint(run, *args, **options)
        return checkpoint(run, *args, **options)

    block.forward = checkpointed  # type: ignore[method-assign]
    setattr(block, _CHECKPOINTED, True)


def _inputs_require_grad(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    return None
