"""`use_liger_kernel`: Liger's Triton kernels where they run, ember's chunked loss elsewhere.

Where liger-kernel is installed and a CUDA GPU and Triton are present, the model is patched in
place as transformers does (`liger_kernel.transformers._apply_liger_kernel_to_instance`, with
`liger_kernel_config` as its keywords), and ember's chunked loss steps aside by default: Liger's
fused linear cross-entropy then runs inside the model's forward. Anywhere else (a CPU, no
liger-kernel) the run uses ember's chunked loss (engine/chunked_loss.py: the same saving, the full
logits never exist) and says once why. liger-kernel is not in ember's extras: it pulls triton, a
286 MB wheel that runs on GPUs only.

Keys of `liger_kernel_config` are checked when the arguments are built: against the keywords
liger-kernel 0.8.5's apply functions take, when liger is not installed (the names are all there is
to check), and against the installed function's signature for the model's type when the Trainer is
built (liger itself would drop an unknown key silently).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import logging
from typing import Any

logger = logging.getLogger("ember")

#: The keywords of liger-kernel 0.8.5's `apply_liger_kernel_to_<model type>` functions.
KNOWN_LIGER_KEYS = (
    "rope",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "rms_norm",
    "swiglu",
    "geglu",
    "layer_norm",
    "relu_squared",
)
_APPLIED = "_ember_liger_applied"


def check_liger_args(args: Any) -> None:
    """Read `liger_kernel_config` (a dict, or JSON from a command line) and refuse unknown keys."""
    config = args.liger_kernel_config
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as err:
            raise ValueError(f"`liger_kernel_config` is not valid JSON ({err}); pass a dict.") from None
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"`liger_kernel_config` must be a dict of keywords or None, got {config!r}.")
    args.liger_kernel_config = config
    if config and not liger_installed():
        _refuse_unknown(config, KNOWN_LIGER_KEYS, "liger-kernel's apply functions")


def _refuse_unknown(config: dict[str, Any], known: tuple[str, ...] | list[str], where: str) -> None:
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"`liger_kernel_config` key {key!r} is not a keyword of {where}.{hint} "
                f"Use some of: {', '.join(known)}."
            )


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def unavailable_reason() -> str | None:
    """Why Liger's kernels cannot run in this process, or None when they can."""
    if not liger_installed():
        return "liger-kernel is not installed (`pip install liger-kernel` on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "Liger's kernels are Triton kernels that run on a CUDA GPU only, and this process has none"
    if importlib.util.find_spec("triton") is None:
        return "triton, which Liger's kernels are written in, is not installed"
    return None


def _apply_function(model: Any) -> Any:
    """liger's apply function for `model`'s type, or None when liger has none for it."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)


def liger_reason(model: Any) -> str | None:
    """Why Liger's kernels will not be applied to `model` here, or None when they will."""
    from ..utils import base_model

    reason = unavailable_reason()
    if reason is None and _apply_function(base_model(model)) is None:
        model_type = getattr(getattr(base_model(model), "config", None), "model_type", None)
        reason = f"liger-kernel has no kernels for this model (model_type {model_type!r})"
    return reason


def plan_liger(model: Any, config: Any) -> str | None:
    """At Trainer construction: None when Liger will be applied to `model`, else the reason it is
    not (logged once, with what ember uses instead). Refuses config keys the apply function lacks."""
    from ..utils import base_model

    reason = liger_reason(model)
    if reason is None and config:
        function = _apply_function(base_model(model))
        names = [n for n in inspect.signature(function).parameters if n != "model"]
        _refuse_unknown(config, names, f"liger-kernel's {function.__name__}")
    if reason is not None:
        logger.warning(
            "ember: use_liger_kernel=True, but %s. ember uses its own chunked cross-entropy loss instead "
            "(chunked_loss: the full logits are never held), which gives the same loss.",
            reason,
        )
    return reason


def apply_liger(model: Any, config: dict[str, Any] | None) -> None:
    """Patch `model` with Liger's kernels, once (a second train() changes nothing)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    from ..utils import base_model

    target = base_model(model)
    if getattr(target, _APPLIED, False):
        return
    _apply_liger_kernel_to_instance(model=target, **(config or {}))
    setattr(target, _APPLIED, True)


def chunked_loss_setting(chunked_loss: bool | None, liger_applied: bool | None) -> bool | None:
    """The chunked-loss mode a run uses. `liger_applied`: None without use_liger_kernel, True when
    Liger patched the model (its fused loss runs in the forward: ember's steps aside unless asked
    for), False when it could not (ember's chunked loss on every micro-batch, unless turned off)."""
    if liger_applied is None or chunked_loss is not None:
        return chunked_loss
    return not liger_applied
