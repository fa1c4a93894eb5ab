"""Optimizers, parameter groups and learning-rate schedulers built from TrainingArguments.

Names, defaults and lr curves follow transformers 5.x so a run switched over from the HF Trainer
trains the same way. Schedulers keep their whole state as plain numbers and strings so a
checkpoint can store them as JSON and never needs pickle to load them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from ..args.names import SCHEDULER_NAMES
from .optimizers import NULLABLE_OPTIM_ARGS, OPTIM_ARG_TYPES, build_named_optimizer

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments

logger = logging.getLogger(__name__)

# Extra keyword arguments each optimizer accepts through `optim_args`, with their type.
_OPTIM_ARG_TYPES: dict[str, dict[str, type]] = {
    "adamw_torch": {"amsgrad": bool, "maximize": bool, "foreach": bool},
    "adamw_torch_fused": {"amsgrad": bool, "maximize": bool},
    "sgd": {"momentum": float, "dampening": float, "nesterov": bool, "maximize": bool},
    "adagrad": {"lr_decay": float, "eps": float, "initial_accumulator_value": float, "maximize": bool},
    "rmsprop": {"momentum": float, "alpha": float, "eps": float, "centered": bool, "maximize": bool},
    **OPTIM_ARG_TYPES,  # the names optimizers.py builds
}
# optim_args keys that duplicate a TrainingArguments field: point the user at the field.
_FIELD_FOR_OPTIM_ARG = {
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "betas": "adam_beta1/adam_beta2",
}

# HF excludes parameters from weight decay by these name patterns too; kept for identical groups.
_NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
# Class names such as LayerNorm, LlamaRMSNorm, T5LayerNorm, BatchNorm2d, _InstanceNorm.
_NORM_CLASS_NAME = re.compile(r"Norm(?:\d+d)?$")


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _names(names: Any) -> str:
    return ", ".join(names)


def _is_norm_module(module: nn.Module) -> bool:
    return any(_NORM_CLASS_NAME.search(cls.__name__) for cls in type(module).__mro__)


def get_decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: everything but biases and norm weights."""
    in_norm = {id(p) for module in model.modules() if _is_norm_module(module) for p in module.parameters()}
    return [
        name
        for name, param in model.named_parameters()
        if id(param) not in in_norm and not _NO_DECAY_NAME.search(name.lower())
    ]


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decay group and a no-decay group; empty groups are left out."""
    decay_names = set(get_decay_parameter_names(model))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if name in decay_names else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError(
            "model has no parameters with requires_grad=True, so there is nothing to optimize; "
            "unfreeze some parameters before training"
        )
    return groups


def _parse_value(text: str) -> bool | int | float | str | None:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_optim_args(optim_args: str | None) -> dict[str, bool | int | float | str | None]:
    """Parse the HF `optim_args` string "k=v,k2=v2" into a dict of typed values."""
    if not optim_args:
        return {}
    parsed: dict[str, bool | int | float | str | None] = {}
    for item in optim_args.replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(
                f"optim_args={optim_args!r}: cannot parse {item!r}; write comma-separated key=value pairs, "
                "e.g. 'momentum=0.9,nesterov=true'"
            )
        parsed[key] = _parse_value(value)
    return parsed


def _coerce_optim_arg(optim: str, key: str, value: Any, kind: type) -> Any:
    if value is None and key in NULLABLE_OPTIM_ARGS:  # None lets the package choose
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and (isinstance(value, bool) or value in (0, 1)):
        return bool(value)
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"optim_args: {key}={value!r} for optim={optim!r} must be a {kind.__name__}")


def _optim_kwargs(optim: str, optim_args: str | None) -> dict[str, Any]:
    allowed = _OPTIM_ARG_TYPES[optim]
    kwargs = {}
    for key, value in parse_optim_args(optim_args).items():
        if key not in allowed:
            hint = (
                f"; set the `{_FIELD_FOR_OPTIM_ARG[key]}` field instead"
                if key in _FIELD_FOR_OPTIM_ARG
                else ""
            )
            valid = f"valid: {', '.join(allowed)}" if allowed else "it reads none"
            raise ValueError(f"optim_args: {key!r} is not an option of optim={optim!r} ({valid}){hint}")
        kwargs[key] = _coerce_optim_arg(optim, key, value, allowed[key])
    return kwargs


def _fused_unsupported_reason(groups: list[dict[str, Any]]) -> str | None:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper; older/newer torch may move it
        devices = {"cuda", "cpu"}
    for group in groups:
        for param in group["params"]:
            if param.device.type not in devices:
                return (
                    f"parameters on device {param.device.type!r} (fused kernels exist for {sorted(devices)})"
                )
            if not torch.is_floating_point(param):
                return f"parameters of dtype {param.dtype} (fused needs floating point)"
    return None


def _fused_adamw(groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    reason = _fused_unsupported_reason(groups)
    if reason is None:
        try:
            # Copies: torch writes defaults (fused=True) into the group dicts it is given.
            return torch.optim.AdamW([dict(g) for g in groups], fused=True, **kwargs)
        except (RuntimeError, ValueError) as err:
            reason = str(err)
    logger.warning(
        "optim='adamw_torch_fused': fused AdamW cannot run here (%s); falling back to the foreach/plain "
        "AdamW, which computes the same update more slowly. Set optim='adamw_torch' to silence this.",
        reason,
    )
    return torch.optim.AdamW([dict(g) for g in groups], **kwargs)


def build_optimizer(args: TrainingArguments, model: nn.Module) -> torch.optim.Optimizer:
    """Optimizer named by `args.optim`, with HF-style decay/no-decay parameter groups."""
    optim = _enum_value(args.optim)
    if optim not in _OPTIM_ARG_TYPES:
        # Names TrainingArguments refuses (no device ember runs on has them) land here when set after it.
        raise ValueError(f"optim={optim!r} is not supported; choose one of: {_names(_OPTIM_ARG_TYPES)}")
    extra = _optim_kwargs(optim, args.optim_args)
    groups = build_param_groups(model, args.weight_decay)
    lr = args.learning_rate
    if optim in ("adamw_torch", "adamw_torch_fused"):
        kwargs = {"lr": lr, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon, **extra}
        if optim == "adamw_torch_fused":
            return _fused_adamw(groups, kwargs)
        return torch.optim.AdamW(groups, **kwargs)
    if optim == "sgd":
        return torch.optim.SGD(groups, lr=lr, **{"momentum": 0.0, **extra})
    if optim == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, **extra)
    if optim == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, **extra)
    return build_named_optimizer(optim, args, model, groups, extra)


def build_optimizer_from_cls(
    optimizer_cls: Any,
    optimizer_kwargs: Mapping[str, Any],
    model: nn.Module,
    args: TrainingArguments | None = None,
) -> torch.optim.Optimizer:
    """Optimizer from the Trainer's `optimizer_cls_and_kwargs`, with the same parameter groups.

    The decay group uses `optimizer_kwargs["weight_decay"]` when given, else `args.weight_decay`.
    As in HF, a `params` entry replaces the groups, and a class that is not an Optimizer subclass is a
    factory called as `optimizer_cls()(model, **optimizer_kwargs)`.
    """
    kwargs = dict(optimizer_kwargs)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        return optimizer_cls()(model, **kwargs)
    if "params" in kwargs:
        return optimizer_cls(kwargs.pop("params"), **kwargs)
    weight_decay = kwargs.pop("weight_decay", getattr(args, "weight_decay", 0.0))
    return optimizer_cls(build_param_groups(model, weight_decay), **kwargs)


# ----------------------------------------------------------------------------------------------
# Schedulers. Each formula is a plain function of the step and plain params, so the scheduler's
# state is (name, params, counters) and round-trips through JSON.


def _warmup(step: int, num_warmup_steps: int) -> float:
    return float(step) / float(max(1, num_warmup_steps))


def _linear(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def _progress(step: int, num_warmup_steps: int, num_training_steps: int) -> float:
    return float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))


def _cosine(
    step: int, num_warmup_steps: int, num_training_steps: int, num_cycles: float, min_lr_rate: float = 0.0
) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = _progress(step, num_warmup_steps, num_training_steps)
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    # With min_lr_rate == 0 this is exactly the plain cosine factor.
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _cosine_with_restarts(
    step: int, num_warmup_steps: int, num_training_steps: int, num_cycles: float
) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = _progress(step, num_warmup_steps, num_training_steps)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _cosine_warmup_with_min_lr(
    step: int,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float,
    min_lr_rate: float,
    warmup_lr_rate: float | None,
) -> float:
    # HF's variant counts from step+1, so the first step already has a non-zero lr.
    if step < num_warmup_steps:
        if warmup_lr_rate is None:
            return (step + 1.0) / max(1.0, float(num_warmup_steps))
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * step / max(1, num_warmup_steps - 1)
    progress = (step - num_warmup_steps + 1.0) / max(1.0, float(num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _polynomial(
    step: int, num_warmup_steps: int, num_training_steps: int, lr_end: float, power: float, lr_init: float
) -> float:
    # LambdaLR multiplies by the initial lr, so the absolute lr is divided by it here.
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    if step > num_training_steps:
        return lr_end / lr_init
    pct_remaining = 1 - (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    return ((lr_init - lr_end) * pct_remaining**power + lr_end) / lr_init


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, num_warmup_steps: int) -> float:
    return _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0


def _inverse_sqrt(step: int, num_warmup_steps: int, timescale: float) -> float:
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return 1.0 / math.sqrt((step + timescale - num_warmup_steps) / timescale)


def _warmup_stable_decay(
    step: int,
    num_warmup_steps: int,
    num_stable_steps: int,
    num_decay_steps: int,
    warmup_type: str,
    decay_type: str,
    min_lr_ratio: float,
    num_cycles: float,
) -> float:
    if step < num_warmup_steps:
        progress = float(step) / float(max(1, num_warmup_steps))
        if warmup_type == "linear":
            factor = progress
        elif warmup_type == "cosine":
            factor = 0.5 * (1.0 - math.cos(math.pi * progress))
        else:
            factor = 1.0 - math.sqrt(1.0 - progress)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < num_warmup_steps + num_stable_steps:
        return 1.0
    if step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = float(step - num_warmup_steps - num_stable_steps) / float(max(1, num_decay_steps))
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
        else:
            factor = 1.0 - math.sqrt(progress)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


_FORMULAS: dict[str, Callable[..., float]] = {
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "inverse_sqrt": _inverse_sqrt,
    "cosine_with_min_lr": _cosine,
    "cosine_warmup_with_min_lr": _cosine_warmup_with_min_lr,
    "warmup_stable_decay": _warmup_stable_decay,
}

_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _json_safe(value: Any) -> Any:
    """Plain JSON values only: tensors become numbers, inf/nan become strings (strict JSON has neither)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_restore(value: Any) -> Any:
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, Mapping):
        return {k: _json_restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_restore(v) for v in value]
    return value


class FormulaLR(LambdaLR):
    """LambdaLR whose factor is a named formula with plain params, so its state_dict is JSON.

    `FormulaLR(opt, "cosine", {"num_warmup_steps": 10, "num_training_steps": 100, "num_cycles": 0.5})`
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, name: str, params: Mapping[str, Any], last_epoch: int = -1
    ) -> None:
        if name not in _FORMULAS:
            raise ValueError(f"lr_scheduler_type={name!r} has no formula; choose one of: {_names(_FORMULAS)}")
        self.name = name
        self.params = dict(params)
        super().__init__(optimizer, self.lr_factor, last_epoch=last_epoch)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the initial lr at `step` (what LambdaLR's lambda returns)."""
        return _FORMULAS[self.name](step, **self.params)

    def state_dict(self) -> dict[str, Any]:
        return _json_safe({k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = _json_restore(dict(state_dict))
        name, params = state.get("name", self.name), state.get("params", self.params)
        if name not in _FORMULAS:
            raise ValueError(f"scheduler state names an unknown formula {name!r}; valid: {_names(_FORMULAS)}")
        if (name, params) != (self.name, self.params):
            # The saved schedule wins so that a resumed run continues the exact curve it was on.
            logger.warning(
                "lr scheduler in the checkpoint (%s %s) differs from the one built from the current "
                "arguments (%s %s); continuing the checkpoint's schedule.",
                name,
                params,
                self.name,
                self.params,
            )
        self.__dict__.update(state)


class PlateauLR(ReduceLROnPlateau):
    """ReduceLROnPlateau whose state_dict is strict JSON (its `best` starts at +/-inf)."""

    def state_dict(self) -> dict[str, Any]:
        return _json_safe(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(_json_restore(dict(state_dict)))


def warmup_steps_for(warmup_steps: float, num_training_steps: int) -> int:
    """Warmup length as HF computes it: >= 1 is a step count, < 1 a ratio of the training steps (ceil)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 (a count if >= 1, a ratio if < 1)")
    if warmup_steps >= 1:
        return int(warmup_steps)
    return math.ceil(num_training_steps * warmup_steps)


_REQUIRED = object()
# Keys each formula scheduler accepts in `lr_scheduler_kwargs`, with HF's defaults.
_SCHEDULER_KWARGS: dict[str, dict[str, Any]] = {
    "linear": {},
    "cosine": {"num_cycles": 0.5},
    "cosine_with_restarts": {"num_cycles": 1},
    "polynomial": {"lr_end": 1e-7, "power": 1.0},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": None},
    "cosine_with_min_lr": {"num_cycles": 0.5, "min_lr": None, "min_lr_rate": None},
    "cosine_warmup_with_min_lr": {
        "num_cycles": 0.5,
        "min_lr": None,
        "min_lr_rate": None,
        "warmup_lr_rate": None,
    },
    "warmup_stable_decay": {
        "num_decay_steps": _REQUIRED,
        "num_stable_steps": None,
        "warmup_type": "linear",
        "decay_type": "cosine",
        "min_lr_ratio": 0.0,
        "num_cycles": 0.5,
    },
}


def _kwargs_error(name: str, problem: str) -> ValueError:
    return ValueError(f"lr_scheduler_kwargs for lr_scheduler_type={name!r}: {problem}")


def _numbers(name: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None or value is _REQUIRED or key in ("warmup_type", "decay_type"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _kwargs_error(name, f"{key}={value!r} must be a number")


def _min_lr_rate(name: str, values: dict[str, Any], lr: float) -> float:
    if values["min_lr"] is not None and values["min_lr_rate"] is not None:
        raise _kwargs_error(name, "set only one of min_lr and min_lr_rate")
    if values["min_lr"] is not None:
        return values["min_lr"] / lr
    if values["min_lr_rate"] is None:
        raise _kwargs_error(name, "set min_lr (absolute) or min_lr_rate (fraction of learning_rate)")
    return float(values["min_lr_rate"])


def _wsd_params(name: str, values: dict[str, Any], warmup: int, total: int) -> dict[str, Any]:
    if values["num_decay_steps"] is _REQUIRED:
        raise _kwargs_error(name, "num_decay_steps is required, e.g. {'num_decay_steps': 100}")
    for key in ("warmup_type", "decay_type"):
        if values[key] not in ("linear", "cosine", "1-sqrt"):
            raise _kwargs_error(name, f"{key}={values[key]!r} must be 'linear', 'cosine' or '1-sqrt'")
    stable = values["num_stable_steps"]
    if stable is None:
        stable = total - warmup - values["num_decay_steps"]
        if stable < 0:
            raise _kwargs_error(
                name, f"warmup ({warmup}) + num_decay_steps exceeds the {total} training steps; lower them"
            )
    return {**values, "num_warmup_steps": warmup, "num_stable_steps": stable}


def _formula_params(
    name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int, kwargs: dict
) -> dict:
    spec = _SCHEDULER_KWARGS[name]
    unknown = sorted(set(kwargs) - set(spec))
    if unknown:
        raise _kwargs_error(name, f"unknown keys {unknown}; valid keys: {sorted(spec) or 'none'}")
    values = {**spec, **kwargs}
    _numbers(name, values)
    base = {"num_warmup_steps": warmup, "num_training_steps": total}
    lr = optimizer.defaults["lr"]
    if name == "constant":
        return {}
    if name == "constant_with_warmup":
        return {"num_warmup_steps": warmup}
    if name == "polynomial":
        if not lr > values["lr_end"]:
            raise _kwargs_error(
                name, f"lr_end={values['lr_end']} must be smaller than the learning rate {lr}"
            )
        return {**base, **values, "lr_init": lr}
    if name == "inverse_sqrt":
        timescale = values["timescale"] if values["timescale"] is not None else (warmup or 10_000)
        if timescale <= 0:
            raise _kwargs_error(name, f"timescale={timescale} must be > 0")
        return {"num_warmup_steps": warmup, "timescale": timescale}
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        rate = _min_lr_rate(name, values, lr)
        extra = {"warmup_lr_rate": values["warmup_lr_rate"]} if "warmup_lr_rate" in values else {}
        return {**base, "num_cycles": values["num_cycles"], "min_lr_rate": rate, **extra}
    if name == "warmup_stable_decay":
        return _wsd_params(name, values, warmup, total)
    return {**base, **values}


def _plateau(optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> PlateauLR:
    try:
        return PlateauLR(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise _kwargs_error(
            "reduce_lr_on_plateau", f"{err} (see torch.optim.lr_scheduler.ReduceLROnPlateau)"
        ) from err


def build_scheduler(
    args: TrainingArguments, optimizer: torch.optim.Optimizer, num_training_steps: int
) -> FormulaLR | PlateauLR:
    """Scheduler named by `args.lr_scheduler_type`, with `args.lr_scheduler_kwargs` and HF's formulas."""
    name = _enum_value(args.lr_scheduler_type)
    kwargs = args.lr_scheduler_kwargs or {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"lr_scheduler_kwargs must be a dict, got {type(kwargs).__name__}")
    kwargs = dict(kwargs)
    if name == "reduce_lr_on_plateau":
        return _plateau(optimizer, kwargs)
    if name not in _FORMULAS:
        raise ValueError(
            f"lr_scheduler_type={name!r} is not supported; choose one of: {_names(SCHEDULER_NAMES)}"
        )
    warmup = warmup_steps_for(args.warmup_steps, num_training_steps)
    return FormulaLR(optimizer, name, _formula_params(name, optimizer, warmup, num_training_steps, kwargs))
