"""Validation of the fine-tuning arguments (activation checkpointing, compile, NEFTune, batch-size
search), called from `TrainingArguments.validate`: bad values fail when the arguments are built."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from typing import Any

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_model_args(args: Any) -> None:
    from .liger import check_liger_args

    check_liger_args(args)
    _resolve_checkpointing_aliases(args)
    _check_checkpointing_kwargs(args)
    _check_compile(args)
    _check_runtime(args)
    if args.auto_find_batch_size and args.world_size > 1:
        raise ValueError(
            "`auto_find_batch_size` works on one process only: an out-of-memory error on one rank would "
            "leave the others waiting in a collective. Set per_device_train_batch_size yourself."
        )
    alpha = args.neftune_noise_alpha
    if alpha is not None and not alpha > 0:
        raise ValueError(f"`neftune_noise_alpha` must be > 0 (5 to 15 is usual) or unset, got {alpha!r}.")


def _check_compile(args: Any) -> None:
    # As transformers: naming a backend or a mode turns compilation on.
    if args.torch_compile_backend is not None or args.torch_compile_mode is not None:
        args.torch_compile = True
    if args.torch_compile_mode is not None and args.torch_compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"`torch_compile_mode`={args.torch_compile_mode!r} is not a torch.compile mode; "
            f"use one of {list(COMPILE_MODES)} or leave it unset."
        )
    backend = args.torch_compile_backend
    if backend is not None:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ValueError(
                f"`torch_compile_backend`={backend!r} is not a torch.compile backend here; use one of "
                f"{sorted(known)} or leave it unset (inductor)."
            )


def _resolve_checkpointing_aliases(args: Any) -> None:
    """transformers 5.24: `gradient_checkpointing*` are aliases of `activation_checkpointing*`, used
    when the new name is unset; afterwards the old names mirror the new ones."""
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if getattr(args, new) is None and getattr(args, old) is not None:
            setattr(args, new, getattr(args, old))
        setattr(args, old, getattr(args, new))
    if args.activation_checkpointing is None:
        args.activation_checkpointing = args.gradient_checkpointing = False


def _check_checkpointing_kwargs(args: Any) -> None:
    from torch.utils.checkpoint import checkpoint

    from .pipeline import OWN_CHECKPOINT_KEYS

    value = args.activation_checkpointing_kwargs
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"`activation_checkpointing_kwargs` is not valid JSON ({err}); pass a dict or a JSON object."
            ) from None
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ValueError(
            "`activation_checkpointing_kwargs` must be a dict such as {'use_reentrant': False}, "
            f"got {value!r}."
        )
    value = dict(value)
    allowed = set(inspect.signature(checkpoint).parameters) - {"function", "args", "kwargs"}
    allowed |= set(OWN_CHECKPOINT_KEYS)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(
            f"`activation_checkpointing_kwargs` has unknown keys {unknown}; it takes {sorted(allowed)}."
        )
    every_n = value.get("every_n_layers", 1)
    if not isinstance(every_n, int) or isinstance(every_n, bool) or every_n < 1:
        raise ValueError(
            f"`activation_checkpointing_kwargs['every_n_layers']` must be an int >= 1, got {every_n!r}."
        )
    args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = value


def _check_runtime(args: Any) -> None:
    import os

    steps = args.torch_empty_cache_steps
    if steps is not None and steps < 1:
        raise ValueError(f"`torch_empty_cache_steps` must be >= 1 or unset, got {steps}.")
    if not args.average_tokens_across_devices and args.world_size > 1:
        raise ValueError(
            "`average_tokens_across_devices=False` would normalise each rank's loss by its own tokens, "
            "so ranks with fewer tokens weigh more; ember always divides by the tokens of all ranks "
            "(exact). Leave it True."
        )
    if args.ddp_static_graph and args.gradient_accumulation_steps > 1:
        # torch's reducer asserts when a static graph's backward runs under no_sync (torch 2.13).
        raise ValueError(
            "`ddp_static_graph=True` does not work with gradient_accumulation_steps > 1 (ember skips the "
            "gradient sync of accumulated micro-batches, which DDP's static graph cannot); use one or the "
            "other."
        )
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or args.world_size)
    if args.save_on_each_node and local != args.world_size:
        raise ValueError(
            "`save_on_each_node=True` on several nodes is not supported by ember: it saves on the main "
            "process only. Put output_dir on a file system all nodes share and leave it False."
        )
