"""Checking and normalising the distributed fields of TrainingArguments (ddp_*, fsdp, deepspeed,
parallelism_config).

Names and accepted values follow transformers 5: `fsdp=True` (or the legacy option string
'full_shard offload auto_wrap'), `fsdp_config` as a dict or a JSON file whose keys may carry the
`fsdp_` prefix, `deepspeed` as a dict or a JSON file. Every error names the field.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from typing import Any, Protocol


class DistributedFields(Protocol):
    """The fields of TrainingArguments checked here (named so args/training_args.py is not imported back)."""

    ddp_backend: str | None
    ddp_timeout: int
    ddp_bucket_cap_mb: int | None
    fsdp: Any
    fsdp_config: Any
    deepspeed: Any
    parallelism_config: Any
    use_cpu: bool


DDP_BACKENDS: tuple[str, ...] = ("nccl", "gloo", "mpi", "xccl", "hccl", "ccl")
FSDP_LEGACY_OPTIONS: tuple[str, ...] = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
FSDP_WRAP_POLICIES: tuple[str, ...] = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
FSDP_STATE_DICT_TYPES: tuple[str, ...] = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
# key -> kind; everything FSDP2 (`fully_shard`) can honour. FSDP1-only keys are refused by name.
FSDP_CONFIG_KEYS: dict[str, str] = {
    "version": "int",
    "reshard_after_forward": "bool",
    "cpu_offload": "bool",
    "activation_checkpointing": "bool",
    "auto_wrap_policy": "str",
    "transformer_layer_cls_to_wrap": "list",
    "min_num_params": "int",
    "state_dict_type": "str",
    "cpu_ram_efficient_loading": "bool",
    "mixed_precision_reduce_dtype": "str",
}
_FSDP1_KEYS = (
    "backward_prefetch",
    "forward_prefetch",
    "use_orig_params",
    "sync_module_states",
    "limit_all_gathers",
)
_XLA_KEYS = ("xla", "xla_fsdp_v2", "xla_fsdp_grad_ckpt", "xla_fsdp_settings")


# accelerate's ParallelismConfig sizes; their product is the number of processes.
PARALLELISM_SIZES: tuple[str, ...] = ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "sp_size")
# ember's own key: a tensor-parallel plan that replaces the model's (module pattern -> style name).
PARALLELISM_KEYS: tuple[str, ...] = (*PARALLELISM_SIZES, "tp_plan")


def load_json_file(field: str, path: str) -> dict[str, Any]:
    """The JSON object in the file `path`, given as the value of `field`; errors name both."""
    if not os.path.isfile(path):
        raise ValueError(f"`{field}`={path!r} is not a file; pass a dict or the path of a JSON file.")
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"`{field}`: cannot read {path} as JSON ({err}); fix the file.") from None
    if not isinstance(value, dict):
        raise ValueError(f"`{field}`: {path} must hold a JSON object, got {type(value).__name__}.")
    return value


def _as_bool(field: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"`{field}['{key}']` must be true or false, got {value!r}.")


def _apply_legacy_fsdp(value: str, config: dict[str, Any]) -> None:
    for item in value.split():
        if item == "full_shard":
            config.setdefault("reshard_after_forward", True)
        elif item == "shard_grad_op":
            config.setdefault("reshard_after_forward", False)
        elif item == "offload":
            config.setdefault("cpu_offload", True)
        elif item == "auto_wrap":
            pass  # wrapping transformer blocks is the default
        elif item in ("no_shard", "hybrid_shard", "hybrid_shard_zero2"):
            raise ValueError(
                f"`fsdp`={item!r} is an FSDP1 sharding strategy; ember runs FSDP2 (fully_shard), which "
                "offers full_shard (default) and shard_grad_op. Use fsdp=True, or DDP for no sharding."
            )
        else:
            close = difflib.get_close_matches(item, FSDP_LEGACY_OPTIONS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"`fsdp` option {item!r} is unknown.{hint} Use fsdp=True and fsdp_config.")


def normalise_fsdp_config(raw: Any, fsdp: Any) -> dict[str, Any]:
    """`fsdp_config` as a dict with checked, typed values (legacy `fsdp` options folded in)."""
    field = "fsdp_config"
    config = load_json_file(field, raw) if isinstance(raw, str) else dict(raw or {})
    config = {(k[5:] if k.startswith("fsdp_") else k): v for k, v in config.items()}
    if isinstance(fsdp, str):
        _apply_legacy_fsdp(fsdp, config)
    for key in list(config):
        if key in _XLA_KEYS:
            if config[key]:
                raise ValueError(f"`{field}['{key}']`: ember has no XLA support; remove it.")
            del config[key]
            continue
        if key in _FSDP1_KEYS:
            raise ValueError(
                f"`{field}['{key}']` is an FSDP1 option; ember runs FSDP2 (fully_shard), which has no "
                "such setting. Remove it."
            )
        kind = FSDP_CONFIG_KEYS.get(key)
        if kind is None:
            close = difflib.get_close_matches(key, FSDP_CONFIG_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(FSDP_CONFIG_KEYS)}."
            raise ValueError(f"`{field}` has an unknown key {key!r}.{hint}")
        config[key] = _typed(field, key, kind, config[key])
    if config.get("version", 2) != 2:
        raise ValueError(f"`{field}['version']`={config['version']}: ember runs FSDP2 only; set it to 2.")
    _choose(field, "auto_wrap_policy", config, FSDP_WRAP_POLICIES)
    _choose(field, "state_dict_type", config, FSDP_STATE_DICT_TYPES)
    if config.get("cpu_ram_efficient_loading"):
        raise ValueError(
            f"`{field}['cpu_ram_efficient_loading']` is not supported by ember yet; remove it (each rank "
            "builds the model, then fully_shard keeps only its shard)."
        )
    return config


def _typed(field: str, key: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        return _as_bool(field, key, value)
    if kind == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{field}['{key}']` must be an integer, got {value!r}.") from None
    if kind == "list":
        items = [value] if isinstance(value, str) else list(value or [])
        return [str(v) for v in items]
    return str(value)


def _choose(field: str, key: str, config: dict[str, Any], choices: tuple[str, ...]) -> None:
    if key in config:
        config[key] = str(config[key]).upper()
        if config[key] not in choices:
            raise ValueError(f"`{field}['{key}']`={config[key]!r} must be one of {', '.join(choices)}.")


def _parallelism_mapping(raw: Any) -> dict[str, Any]:
    """The config as a plain dict: from a dict, a JSON file, or an object with the size attributes
    (accelerate's `ParallelismConfig`, read without importing accelerate)."""
    field = "parallelism_config"
    if isinstance(raw, str):
        return load_json_file(field, raw)
    if isinstance(raw, Mapping):
        return dict(raw)
    if any(hasattr(raw, name) for name in PARALLELISM_SIZES):
        config = {
            name: getattr(raw, name) for name in PARALLELISM_SIZES if getattr(raw, name, None) is not None
        }
        if getattr(getattr(raw, "tp_handler", None), "enable_async_tp", False):
            raise ValueError(
                f"`{field}.tp_handler.enable_async_tp` is True: asynchronous TP overlaps collectives through "
                "GPU symmetric memory, which ember does not run; set enable_async_tp=False."
            )
        # A cp_handler's cp_comm_strategy ("allgather" / "alltoall") picks how torch's ring attention
        # moves K/V; ember's context parallelism always all-gathers them (strategy/context.py), with
        # the same result. sp_size > 1 is refused below.
        return config
    raise ValueError(
        f"`{field}` must be a dict, a JSON object or file, or an accelerate ParallelismConfig; got "
        f"{type(raw).__name__}."
    )


def normalise_parallelism_config(raw: Any) -> dict[str, Any]:
    """`parallelism_config` as a dict of checked sizes (every size present, 1 when not given) plus
    `tp_plan` when the user gives one. The world size is checked where the strategy starts."""
    field = "parallelism_config"
    config = _parallelism_mapping(raw)
    for key in config:
        if key not in PARALLELISM_KEYS:
            close = difflib.get_close_matches(key, PARALLELISM_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(PARALLELISM_KEYS)}."
            raise ValueError(f"`{field}` has an unknown key {key!r}.{hint}")
    out: dict[str, Any] = {}
    for name in PARALLELISM_SIZES:
        value = config.get(name, 1)
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{field}['{name}']` must be a whole number >= 1, got {value!r}.") from None
        if number != value and not (isinstance(value, str) and value.strip() == str(number)):
            raise ValueError(f"`{field}['{name}']` must be a whole number >= 1, got {value!r}.")
        if number < 1:
            raise ValueError(
                f"`{field}['{name}']` must be >= 1, got {number}; 1 means that dimension is unused."
            )
        out[name] = number
    if out["sp_size"] > 1:
        raise ValueError(
            f"`{field}['sp_size']`={out['sp_size']}: accelerate's sp_size is DeepSpeed's Ulysses sequence "
            "parallelism, which ember does not run. Set sp_size to 1."
        )
    plan = config.get("tp_plan")
    if plan is not None:
        if not isinstance(plan, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in plan.items()
        ):
            raise ValueError(
                f"`{field}['tp_plan']` must map module names (with * for any index, e.g. "
                "'model.layers.*.mlp.up_proj') to style names such as 'colwise' or 'rowwise'."
            )
        out["tp_plan"] = dict(plan)
    return out


def parallelism_world_size(config: Mapping[str, Any]) -> int:
    """The number of processes a normalised `parallelism_config` needs."""
    size = 1
    for name in PARALLELISM_SIZES:
        size *= int(config.get(name, 1))
    return size


def check_parallelism_world_size(config: Mapping[str, Any], world_size: int) -> None:
    needed = parallelism_world_size(config)
    if needed != world_size:
        sizes = " x ".join(
            f"{name}={config.get(name, 1)}" for name in PARALLELISM_SIZES if config.get(name, 1) != 1
        )
        raise ValueError(
            f"`parallelism_config` sizes multiply to {needed} ({sizes or 'all 1'}), but {world_size} "
            f"process(es) were launched; launch {needed} processes (torchrun --nproc_per_node {needed}) or "
            f"change the sizes so that their product is {world_size}."
        )


def fsdp_enabled(value: Any) -> bool:
    """`fsdp` as transformers reads it: True, or a non-empty option string such as 'full_shard'."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "no", "none", "0")
    return bool(value)


def check_distributed_args(args: DistributedFields) -> None:
    """Validate and normalise the ddp_*, fsdp, fsdp_config and deepspeed fields in place."""
    backend = args.ddp_backend
    if backend is not None and backend not in DDP_BACKENDS and ":" not in backend:
        raise ValueError(
            f"`ddp_backend`={backend!r} is not a torch.distributed backend; use one of "
            f"{', '.join(DDP_BACKENDS)} (or a per-device spec like 'cpu:gloo,cuda:nccl'), or leave it unset."
        )
    if args.ddp_timeout <= 0:
        raise ValueError(f"`ddp_timeout` must be > 0 seconds, got {args.ddp_timeout!r}.")
    if args.ddp_bucket_cap_mb is not None and args.ddp_bucket_cap_mb <= 0:
        raise ValueError(
            f"`ddp_bucket_cap_mb` must be > 0, got {args.ddp_bucket_cap_mb!r}; or leave it unset."
        )
    enabled = fsdp_enabled(args.fsdp)
    if args.fsdp_config is not None and not enabled:
        raise ValueError("`fsdp_config` is set but `fsdp` is not; set fsdp=True (or remove fsdp_config).")
    if enabled:
        args.fsdp_config = normalise_fsdp_config(args.fsdp_config, args.fsdp)
        args.fsdp = True
    elif args.fsdp is not None:
        args.fsdp = False
    if args.parallelism_config is not None:
        config = normalise_parallelism_config(args.parallelism_config)
        if args.deepspeed is not None:
            raise ValueError(
                "`parallelism_config` and `deepspeed` are both set; ember lays out the mesh with PyTorch's "
                "own TP and FSDP2, not DeepSpeed. Choose one of them."
            )
        if enabled and config["dp_shard_size"] == 1:
            raise ValueError(
                "`fsdp` is set but `parallelism_config['dp_shard_size']` is 1, so there is nothing to shard "
                "over; set dp_shard_size to the number of ranks that share one copy of the model (or unset "
                "fsdp)."
            )
        if "WORLD_SIZE" in os.environ:
            check_parallelism_world_size(config, int(os.environ["WORLD_SIZE"] or 1))
        args.parallelism_config = config
    if args.deepspeed is not None:
        if enabled:
            raise ValueError("`fsdp` and `deepspeed` are both set; choose one of them.")
        if isinstance(args.deepspeed, str):
            load_json_file("deepspeed", args.deepspeed)
        elif isinstance(args.deepspeed, Mapping):
            args.deepspeed = dict(args.deepspeed)
