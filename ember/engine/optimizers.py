"""The `optim` names that torch does not build itself: each of transformers' `OptimizerNames`, built
from its own package (imported only when named) with the meaning transformers' Trainer gives the name
and its `optim_args`; and what ember adds so that every one of them checkpoints without pickle and
resumes exactly.

- Optimizers whose state holds more than tensors and numbers get a state_dict() that says it in
  plain data, and a load_state_dict() that rebuilds it: torchao's quantized state tensors (a tensor
  subclass), GaLore's and APOLLO's projector objects, GrokAdamW's state (kept in its param groups,
  keyed by parameter), and the memory layout of non-contiguous state tensors. The checkpoint names
  an entry of a fixed table, never a module or class, so loading runs no code the checkpoint chose.
- `*_layerwise` and `lomo` update each weight inside backward, as its gradient arrives; their
  optimizer's step() is empty. The layer-wise wrapper holds one optimizer per parameter and shares
  their state with its own, so the scheduler and checkpoints see one ordinary optimizer.
- Schedule-free optimizers have a train and an eval point: `optimizer_eval_mode` switches to the
  eval point for evaluation and saved weights, and back.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..args.names import BACKWARD_STEP_OPTIMIZERS

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments

logger = logging.getLogger(__name__)

# Keys each optimizer reads from `optim_args`, with their type: transformers' keys for each name.
_BNB_RMSPROP: dict[str, type] = {"alpha": float, "eps": float, "momentum": float, "centered": bool}
_ADEMAMIX: dict[str, type] = {
    "beta1": float,
    "beta2": float,
    "beta3": float,
    "alpha": float,
    "eps": float,
    "t_alpha": int,
    "t_beta3": int,
}
_GALORE: dict[str, type] = {"rank": int, "update_proj_gap": int, "scale": float, "proj_type": str}
_APOLLO: dict[str, type] = {**_GALORE, "proj": str, "scale_type": str}
_SCHEDULE_FREE: dict[str, type] = {"weight_lr_power": float, "r": float}
OPTIM_ARG_TYPES: dict[str, dict[str, type]] = {
    # transformers' Adafactor: transformers reads no optim_args for it; these reach its own options.
    "adafactor": {"eps1": float, "eps2": float, "clip_threshold": float, "decay_rate": float},
    "adamw_anyprecision": {
        "use_kahan_summation": bool,
        "momentum_dtype": str,
        "variance_dtype": str,
        "compensation_buffer_dtype": str,
    },
    "adamw_torch_4bit": {"block_size": int, "bf16_stochastic_round": bool},
    "adamw_torch_8bit": {"block_size": int, "bf16_stochastic_round": bool},
    **dict.fromkeys(("ademamix", "ademamix_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit"), _ADEMAMIX),
    **dict.fromkeys(
        ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "lion_8bit", "lion_32bit")
        + ("paged_lion_32bit", "paged_lion_8bit", "lomo", "adalomo"),
        {},
    ),
    **dict.fromkeys(("rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"), _BNB_RMSPROP),
    **{n: _GALORE for n in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor")},
    **{f"{n}_layerwise": _GALORE for n in ("galore_adamw", "galore_adamw_8bit", "galore_adafactor")},
    "apollo_adamw": _APOLLO,
    "apollo_adamw_layerwise": _APOLLO,
    "grokadamw": {
        "alpha_init": float,
        "lamb": float,
        "gamma": float,
        "grokking_signal_decay_rate": float,
        "gradient_clipping": float,
    },
    **dict.fromkeys(("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"), _SCHEDULE_FREE),
    "stable_adamw": {"decouple_lr": bool, "max_lr": float, "kahan_sum": bool},
}
#: optim_args keys that may be None (the package then picks the value).
NULLABLE_OPTIM_ARGS = frozenset({"max_lr", "kahan_sum"})

# Package to install for each module imported here (what the error tells the user).
_PIP_NAMES = {
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "schedulefree": "schedulefree",
    "galore_torch": "galore-torch",
    "apollo_torch": "apollo-torch",
    "lomo_optim": "lomo-optim",
    "grokadamw": "grokadamw",
    "optimi": "torch-optimi",
    "transformers": "transformers",
    "torchdistx": "torchdistx",
}


def _require(module: str, optim: str) -> Any:
    """Import `module` for `optim`, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        pip = _PIP_NAMES.get(top, top)
        how = (
            "it is not on PyPI: build it from its source repository (pytorch/torchdistx)"
            if top == "torchdistx"
            else f"install it with `pip install {pip}` (or `pip install ember[optimizers]`)"
        )
        raise ImportError(
            f"optim={optim!r} is built from the `{pip}` package, which cannot be imported here ({err}); "
            f"{how}, or choose another `optim`."
        ) from err


def _params_on_cuda(groups: list[dict[str, Any]]) -> bool:
    return all(p.device.type == "cuda" for g in groups for p in g["params"])


def _refuse_without_cuda(optim: str, groups: list[dict[str, Any]], why: str, instead: str) -> None:
    if not _params_on_cuda(groups):
        raise ValueError(f"optim={optim!r} needs CUDA: {why}; the model here is not on a CUDA GPU. {instead}")


def _refuse_distributed(optim: str) -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"optim={optim!r} updates each weight inside backward, before the gradients of the other "
            "processes could be averaged in; run it on one process, or choose another `optim`."
        )


def _adam_kwargs(args: TrainingArguments) -> dict[str, Any]:
    return {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


# ---------------------------------------------------------------------------------------------------
# Builders: (name, args, model, decay/no-decay groups, typed optim_args) -> optimizer.

Builder = Callable[[str, "TrainingArguments", nn.Module, list[dict[str, Any]], dict[str, Any]], Any]


def _adafactor(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    # transformers' own Adafactor at a fixed lr (the scheduler's), as its Trainer builds it; not
    # torch.optim.Adafactor, which is a different update.
    optimization = _require("transformers.optimization", name)
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "scale_parameter": False, "relative_step": False}
    if "eps1" in extra or "eps2" in extra:
        kwargs["eps"] = (extra.pop("eps1", 1e-30), extra.pop("eps2", 1e-3))
    return optimization.Adafactor(groups, **kwargs, **extra)


def _anyprecision(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    optimizers = _require("torchdistx.optimizers", name)

    def dtype(key: str, default: str) -> torch.dtype:
        value = getattr(torch, extra.get(key, default), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"optim_args: {key}={extra[key]!r} is no torch dtype (float32, bfloat16, ...)")
        return value

    return optimizers.AnyPrecisionAdamW(  # type: ignore[no-any-return]
        groups,
        lr=args.learning_rate,
        **_adam_kwargs(args),
        use_kahan_summation=extra.get("use_kahan_summation", False),
        momentum_dtype=dtype("momentum_dtype", "float32"),
        variance_dtype=dtype("variance_dtype", "float32"),
        compensation_buffer_dtype=dtype("compensation_buffer_dtype", "bfloat16"),
    )


def _torchao(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    ao = _require("torchao.optim", name)
    cls = ao.AdamW4bit if name == "adamw_torch_4bit" else ao.AdamW8bit
    return storable(cls)(  # type: ignore[no-any-return]
        groups,
        lr=args.learning_rate,
        **_adam_kwargs(args),
        block_size=extra.get("block_size", 256),
        bf16_stochastic_round=extra.get("bf16_stochastic_round", False),
    )


def _bitsandbytes(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    bnb = _require("bitsandbytes.optim", name)
    bits = 8 if "8bit" in name else 32
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "optim_bits": bits}
    if "adam" in name:
        cls = bnb.AdamW
        kwargs.update(_adam_kwargs(args))
    elif "lion" in name:
        cls = bnb.Lion
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
    elif "rmsprop" in name:
        cls = bnb.RMSprop
        kwargs.update(extra)
    else:  # ademamix
        cls = bnb.AdEMAMix
        kwargs["betas"] = (
            extra.get("beta1", args.adam_beta1),
            extra.get("beta2", args.adam_beta2),
            extra.get("beta3", 0.9999),
        )
        kwargs["alpha"] = extra.get("alpha", 5.0)
        kwargs["eps"] = extra.get("eps", args.adam_epsilon)
        kwargs.update({k: extra[k] for k in ("t_alpha", "t_beta3") if k in extra})
    if "rmsprop" not in name:
        # bitsandbytes has no paged state on CPU: there it runs unpaged and says so once.
        kwargs["is_paged"] = "paged" in name
    optimizer = cls(groups, **kwargs)
    if bits == 8:
        # As transformers: embeddings keep 32-bit state (8-bit state on them hurts training).
        manager = bnb.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer  # type: ignore[no-any-return]


def _schedule_free(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    sf = _require("schedulefree", name)
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "weight_lr_power": extra.get("weight_lr_power", 2.0),
        "r": extra.get("r", 0.0),
    }
    if name != "schedule_free_sgd":
        kwargs.update(_adam_kwargs(args))
    if name != "schedule_free_radam":  # RAdam warms up by itself
        warmup = args.warmup_steps
        if 0 < warmup < 1:
            raise ValueError(
                f"optim={name!r} warms up for `warmup_steps` optimizer steps (transformers hands it the "
                f"value as it is), and warmup_steps={warmup} is a ratio; give a number of steps."
            )
        kwargs["warmup_steps"] = int(warmup)
    cls = {
        "schedule_free_adamw": "AdamWScheduleFree",
        "schedule_free_radam": "RAdamScheduleFree",
        "schedule_free_sgd": "SGDScheduleFree",
    }[name]
    return getattr(sf, cls)(groups, **kwargs)  # type: ignore[no-any-return]


def _grokadamw(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    grok = _require("grokadamw", name)
    defaults = {
        "alpha_init": 0.98,
        "lamb": 2.0,
        "gamma": 0.1,
        "grokking_signal_decay_rate": 0.1,
        "gradient_clipping": 1.0,
    }
    return storable(grok.GrokAdamW)(groups, lr=args.learning_rate, **{**defaults, **extra})  # type: ignore[no-any-return]


def _stable_adamw(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    # transformers builds it from torch-optimi (not torchao), with these defaults.
    optimi = _require("optimi", name)
    return optimi.StableAdamW(  # type: ignore[no-any-return]
        groups,
        lr=args.learning_rate,
        **_adam_kwargs(args),
        weight_decay=args.weight_decay,
        decouple_lr=extra.get("decouple_lr", False),
        max_lr=extra.get("max_lr"),
        kahan_sum=extra.get("kahan_sum"),
    )


def _lomo(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    _refuse_distributed(name)
    if name == "adalomo":
        _refuse_without_cuda(
            name,
            groups,
            "lomo_optim's AdaLomo allocates its state with .cuda()",
            "Use optim='lomo' (runs on CPU) or 'adafactor'.",
        )
    lomo = _require("lomo_optim", name)
    return _backward_step_lomo(lomo.AdaLomo if name == "adalomo" else lomo.Lomo)(model, lr=args.learning_rate)


# -- GaLore and APOLLO: low-rank projection of the target modules' gradients ---------------------------


def _target_matches(targets: str | list[str], name: str) -> tuple[bool, bool]:
    """(matched, by a regex), with the meaning transformers gives `optim_target_modules`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None, targets != name
    if name in targets or any(t in name for t in targets):
        return True, False
    return any(re.fullmatch(t, name) is not None for t in targets), True


def _target_weights(name: str, model: nn.Module, targets: str | list[str]) -> list[nn.Parameter]:
    all_linear = isinstance(targets, str) and targets.replace("_", "-") == "all-linear"
    names = set()
    for module_name, module in model.named_modules():
        matched, by_regex = _target_matches(targets, module_name)
        if not isinstance(module, nn.Linear):
            if matched and not by_regex:
                logger.warning("%s matches optim_target_modules but is no nn.Linear; skipped.", module_name)
            continue
        if matched or all_linear:
            names.add(f"{module_name}.weight")
    found = [p for n, p in model.named_parameters() if n in names]
    if not found:
        raise ValueError(
            f"optim_target_modules={targets!r} names no nn.Linear module of the model for optim={name!r}; "
            "give a regex (full match), module names, or 'all-linear'."
        )
    return found


def _low_rank(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    # transformers' groups for these: the rest, then the targets with the projection options; neither
    # takes args.weight_decay (the optimizer's own default applies), so neither does ember.
    if args.weight_decay:
        logger.warning(
            "optim=%r does not apply weight_decay=%s (as in transformers, its groups take the "
            "optimizer's own default); set weight_decay=0 to silence this.",
            name,
            args.weight_decay,
        )
    layerwise = name.endswith("_layerwise")
    base = name.removesuffix("_layerwise")
    if base == "galore_adamw_8bit":
        _refuse_without_cuda(
            name,
            groups,
            "galore_torch's GaLoreAdamW8bit calls torch.cuda.synchronize() every step",
            "Use optim='galore_adamw' on CPU.",
        )
    if layerwise:
        _refuse_distributed(name)
    assert args.optim_target_modules is not None, "TrainingArguments requires it for this optim"
    targets = _target_weights(name, model, args.optim_target_modules)
    if base.startswith("apollo"):
        package = _require("apollo_torch", name)
        cls = package.APOLLOAdamW
        projection: dict[str, Any] = {
            "rank": extra.get("rank", 128),
            "proj": extra.get("proj", "random"),
            "scale_type": extra.get("scale_type", "channel"),
            "update_proj_gap": extra.get("update_proj_gap", 200),
            "scale": extra.get("scale", 1.0),
            "proj_type": extra.get("proj_type", "std"),
            **_adam_kwargs(args),
        }
    else:
        package = _require("galore_torch", name)
        cls = {
            "galore_adamw": package.GaLoreAdamW,
            "galore_adamw_8bit": package.GaLoreAdamW8bit,
            "galore_adafactor": package.GaLoreAdafactor,
        }[base]
        projection = {
            "rank": extra.get("rank", 128),
            "update_proj_gap": extra.get("update_proj_gap", 200),
            "scale": extra.get("scale", 0.25),
            "proj_type": extra.get("proj_type", "std"),
        }
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    if base == "galore_adafactor":
        kwargs.update(scale_parameter=False, relative_step=False)
    # Every other parameter, frozen ones too, in model order: transformers' groups (APOLLO seeds each
    # parameter's projection by its position in them).
    target_ids = {id(p) for p in targets}
    rest = [p for p in model.parameters() if id(p) not in target_ids]
    low_rank_groups = [{"params": rest}, {"params": targets, **projection}]
    low_rank_groups = [g for g in low_rank_groups if g["params"]]
    make = storable(cls)
    if layerwise:
        return LayerwiseOptimizer(low_rank_groups, kwargs, lambda group: make([group], **kwargs))
    return make(low_rank_groups, **kwargs)  # type: ignore[no-any-return]


BUILDERS: dict[str, Builder] = {
    "adafactor": _adafactor,
    "adamw_anyprecision": _anyprecision,
    "adamw_torch_4bit": _torchao,
    "adamw_torch_8bit": _torchao,
    **dict.fromkeys(
        (
            "adamw_bnb_8bit",
            "adamw_8bit",
            "paged_adamw_32bit",
            "paged_adamw_8bit",
            "ademamix",
            "ademamix_8bit",
            "paged_ademamix_32bit",
            "paged_ademamix_8bit",
            "lion_8bit",
            "lion_32bit",
            "paged_lion_32bit",
            "paged_lion_8bit",
            "rmsprop_bnb",
            "rmsprop_bnb_8bit",
            "rmsprop_bnb_32bit",
        ),
        _bitsandbytes,
    ),
    **dict.fromkeys(("schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd"), _schedule_free),
    "grokadamw": _grokadamw,
    "stable_adamw": _stable_adamw,
    "lomo": _lomo,
    "adalomo": _lomo,
    **dict.fromkeys(
        (
            "galore_adamw",
            "galore_adamw_8bit",
            "galore_adafactor",
            "galore_adamw_layerwise",
            "galore_adamw_8bit_layerwise",
            "galore_adafactor_layerwise",
            "apollo_adamw",
            "apollo_adamw_layerwise",
        ),
        _low_rank,
    ),
}


def build_named_optimizer(
    name: str, args: TrainingArguments, model: nn.Module, groups: list[dict[str, Any]], extra: dict[str, Any]
) -> torch.optim.Optimizer:
    """The optimizer `name` (a key of BUILDERS) as transformers' Trainer builds it."""
    if name in BACKWARD_STEP_OPTIMIZERS and args.max_grad_norm:
        logger.warning(
            "optim=%r updates each weight inside backward, so no gradient is left to clip: "
            "max_grad_norm=%s has no effect (nor in transformers) and the logged grad_norm is 0. "
            "Set max_grad_norm=0 to silence this.",
            name,
            args.max_grad_norm,
        )
    return BUILDERS[name](name, args, model, groups, dict(extra))  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------
# Pickle-free state: what safetensors + JSON cannot hold as it is, said in plain data.

_TAG = "ember_optimizer_object"
# Plain-data objects some optimizers keep in their state: rebuilt as an instance of the class named
# here with the saved attributes (tensors, numbers, strings, lists of those).
_STATE_OBJECTS: dict[str, tuple[str, str]] = {
    "galore_torch.GaLoreProjector": ("galore_torch.galore_projector", "GaLoreProjector"),
    "apollo_torch.GaLoreProjector": ("apollo_torch.svd_projector", "GaLoreProjector"),
    "apollo_torch.GradientProjector": ("apollo_torch.random_projector", "GradientProjector"),
}
# Tensor subclasses kept as state: rebuilt from their inner tensors (__tensor_flatten__/unflatten).
_STATE_TENSORS: dict[str, tuple[str, str]] = {
    "torchao.OptimState4bit": ("torchao.optim.subclass_4bit", "OptimState4bit"),
    "torchao.OptimState8bit": ("torchao.optim.subclass_8bit", "OptimState8bit"),
    "torchao.OptimStateFp8": ("torchao.optim.subclass_fp8", "OptimStateFp8"),
}
_KIND_OF_CLASS = {where: kind for kind, where in {**_STATE_OBJECTS, **_STATE_TENSORS}.items()}


def _kind(value: Any) -> str | None:
    cls = type(value)
    return _KIND_OF_CLASS.get((cls.__module__, cls.__name__))


def _plain_attribute(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    return value


def _attribute_from_plain(value: Any) -> Any:
    if isinstance(value, dict) and "dtype" in value:
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"optimizer state names an unknown dtype {value['dtype']!r}")
        return dtype
    if isinstance(value, dict) and "size" in value:
        return torch.Size(value["size"])
    return value


def encode_state(value: Any) -> Any:
    """`value` with every known object and tensor subclass turned into plain data (a tagged dict)."""
    kind = _kind(value)
    if kind in _STATE_TENSORS:
        names, attributes = value.__tensor_flatten__()
        return {
            _TAG: kind,
            "tensors": {n: getattr(value, n) for n in names},
            "attributes": [_plain_attribute(a) for a in attributes],
        }
    if kind in _STATE_OBJECTS:
        return {_TAG: kind, "attributes": {k: encode_state(v) for k, v in vars(value).items()}}
    if type(value) is torch.Tensor and not value.is_contiguous() and 0 not in value.stride():
        # Files hold tensors contiguous; kept as they are, matmuls would round differently after a
        # resume (GaLore's SVD factors are column-major slices).
        return {_TAG: "strided", "tensor": value, "stride": list(value.stride())}
    if isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, nn.Parameter):
        raise TypeError(
            f"optimizer state holds a {type(value).__module__}.{type(value).__name__} tensor, which ember "
            "cannot store without pickle; this optimizer cannot be checkpointed."
        )
    if isinstance(value, dict):
        return {k: encode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(encode_state(v) for v in value)
    return value


def decode_state(value: Any) -> Any:
    """The inverse of `encode_state`, for the classes of its fixed tables only."""
    if isinstance(value, dict) and _TAG in value:
        kind = value[_TAG]
        if kind == "strided":
            dense = value["tensor"]
            out = torch.empty_strided(dense.shape, value["stride"], dtype=dense.dtype, device=dense.device)
            return out.copy_(dense)
        if kind in _STATE_TENSORS:
            cls = getattr(importlib.import_module(_STATE_TENSORS[kind][0]), _STATE_TENSORS[kind][1])
            attributes = [_attribute_from_plain(a) for a in value["attributes"]]
            return cls.__tensor_unflatten__(dict(value["tensors"]), attributes, None, None)
        if kind in _STATE_OBJECTS:
            cls = getattr(importlib.import_module(_STATE_OBJECTS[kind][0]), _STATE_OBJECTS[kind][1])
            obj = cls.__new__(cls)
            obj.__dict__.update({k: decode_state(v) for k, v in value["attributes"].items()})
            return obj
        raise ValueError(f"optimizer state holds an object of unknown kind {kind!r}")
    if isinstance(value, dict):
        return {k: decode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(decode_state(v) for v in value)
    return value


class StorableState(torch.optim.Optimizer):
    """Mixed in before an optimizer class whose state safetensors + JSON cannot hold as it is.

    Besides `encode_state`'s objects: state kept in a param group keyed by parameter (GrokAdamW's)
    is saved keyed by the parameter's index, as torch saves `optimizer.state`.
    """

    def state_dict(self) -> dict[str, Any]:
        saved = super().state_dict()
        groups = []
        for live, packed in zip(self.param_groups, saved["param_groups"]):
            packed = dict(packed)
            inner = packed.get("state")
            if isinstance(inner, Mapping) and any(isinstance(k, torch.Tensor) for k in inner):
                index = {id(p): i for p, i in zip(live["params"], packed["params"])}
                packed["state"] = {index[id(p)]: encode_state(s) for p, s in inner.items()}
            groups.append(packed)
        return {**saved, "state": encode_state(saved["state"]), "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        by_index = {
            i: p
            for live, saved in zip(self.param_groups, state_dict["param_groups"])
            for p, i in zip(live["params"], saved["params"])
        }
        super().load_state_dict({**state_dict, "state": decode_state(state_dict["state"])})
        for group in self.param_groups:
            inner = group.get("state")
            if isinstance(inner, Mapping) and inner and all(isinstance(k, int) for k in inner):
                group["state"] = {by_index[i]: decode_state(s) for i, s in inner.items()}


@cache
def storable(cls: type) -> type:
    """`cls` with `StorableState` mixed in (same name; isinstance(obj, cls) still holds)."""
    return type(cls.__name__, (StorableState, cls), {"__module__": __name__, "__doc__": cls.__doc__})


# ---------------------------------------------------------------------------------------------------
# Optimizers that update the weights inside backward.


class LayerwiseOptimizer(StorableState):
    """transformers' `*_layerwise`: one optimizer per parameter, stepped (and its gradient dropped) in
    the parameter's post-accumulate-grad hook, so at most one full gradient exists at a time.

    To the loop, scheduler and checkpoints this is one optimizer over all the parameters, whose step()
    is empty: each inner optimizer takes its group's current lr when its hook runs, and shares its
    per-parameter state dict with this one, so `state_dict()` holds every parameter's state.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        defaults: dict[str, Any],
        make: Callable[[dict[str, Any]], torch.optim.Optimizer],
    ) -> None:
        super().__init__(groups, defaults)
        self._inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}
        for group in self.param_groups:
            for param in group["params"]:
                inner = make({**group, "params": [param]})
                self._inner[param] = inner
                self._group_of[param] = group
                self.state[param] = inner.state[param]
                if param.requires_grad:
                    param.register_post_accumulate_grad_hook(self._step_parameter)

    def _step_parameter(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        inner = self._inner[param]
        inner.param_groups[0]["lr"] = self._group_of[param]["lr"]
        inner.step()
        inner.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Nothing: each parameter was updated when its gradient arrived."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Each parameter's state goes through its own optimizer's load, with that optimizer's rules
        # (bitsandbytes keeps its quantization state uncast; GaLore rebuilds its projector).
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the loaded optimizer state has other parameter groups than this optimizer")
        state = state_dict["state"]
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            for param, index in zip(group["params"], saved["params"]):
                inner = self._inner[param]
                own = inner.state_dict()
                own["state"] = {0: state[index]} if index in state else {}
                own["param_groups"][0]["lr"] = group["lr"]
                inner.load_state_dict(own)
                self.state[param] = inner.state[param]


@cache
def _backward_step_lomo(cls: type) -> type:
    """lomo_optim's `cls` driven by an ordinary `loss.backward()`, as transformers drives it with
    `fused_backward(loss, lr)`: the update happens in the gradient hooks LOMO registers, the last
    parameter's at the end of backward (queued from the first hook), at the lr the scheduler set;
    step() is empty (there is no gradient left)."""

    class BackwardStep(cls):  # type: ignore[misc, valid-type]
        @property
        def lr(self) -> float:
            groups = self.__dict__.get("param_groups")
            return float(groups[0]["lr"]) if groups else self.__dict__["_lr_before_groups"]

        @lr.setter
        def lr(self, value: float) -> None:
            groups = self.__dict__.get("param_groups")
            if groups:
                for group in groups:
                    group["lr"] = value
            else:
                self.__dict__["_lr_before_groups"] = value

        def fuse_update(self) -> Callable[[Any], Any]:
            update = super().fuse_update()
            self._last_update = update
            self._end_queued = False

            def hook(grad: Any) -> Any:
                if not self._end_queued:
                    self._end_queued = True
                    torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                return update(grad)

            return hook

        def _end_of_backward(self) -> None:
            self._end_queued = False
            self._last_update(0)

        def step(self, closure: Callable[[], float] | None = None) -> None:
            """Nothing: the weights were updated during backward."""

    BackwardStep.__name__ = BackwardStep.__qualname__ = cls.__name__
    return BackwardStep


# ---------------------------------------------------------------------------------------------------
# Schedule-free optimizers: a train point (where gradients are taken) and an eval point (the average).


def _has_modes(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def set_optimizer_mode(optimizer: Any, training: bool) -> None:
    """Put a schedule-free optimizer (and so the weights) at its train or eval point; others: nothing."""
    if _has_modes(optimizer):
        optimizer.train() if training else optimizer.eval()


@contextlib.contextmanager
def optimizer_eval_mode(optimizer: Any) -> Iterator[None]:
    """The weights at the eval point of a schedule-free optimizer inside the block (evaluation, saved
    weights), and back at the train point after it if they were there before."""
    training = _has_modes(optimizer) and all(g.get("train_mode", True) for g in optimizer.param_groups)
    if not training:
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
