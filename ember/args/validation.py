"""Checking `TrainingArguments`: every value once, when the object is built (`validate`); each
error names the field and the fix. Fills the derived defaults in place.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping
from enum import Enum
from functools import cache
from typing import Any

from ..integrations import available_trackers
from .fields import (
    INTERVAL_STRATEGIES,
    LOG_LEVEL_NAMES,
    OPTIMIZER_NAMES,
    REPORT_TO_BACKENDS,
    SAVE_STRATEGIES,
    SCHEDULER_TYPES,
    TOKENS_SEEN_MODES,
    TRAIN_SAMPLING_STRATEGIES,
    IntervalStrategy,
    SaveStrategy,
    SchedulerType,
    TrainingFields,
)
from .hf_only import _check_hf_only, _suggest
from .names import (
    BACKWARD_STEP_OPTIMIZERS,
    LOW_RANK_OPTIMIZERS,
    NONFINITE_POLICIES,
    OPTIMIZERS_REFUSED,
)

_logger = logging.getLogger("ember.args")


# ---------------------------------------------------------------------------------------------------------
# Validation


def validate(args: TrainingFields) -> None:
    """Check every field and fill in the derived defaults, in place.

    Raises ValueError (naming the field and the fix) for any bad value. Runs from `__post_init__`.
    """
    _check_hf_only(args)
    _check_types(args)
    _normalise(args)
    _check_accelerator_and_debug(args)
    _check_choices(args)
    _check_optimizer(args)
    _fill_derived(args)
    _check_ranges(args)
    _check_intervals(args)
    _check_best_model(args)
    _check_dataloader(args)
    _check_log_levels(args)
    _check_hardware(args)
    _check_reliability(args)
    from ..models.options import check_model_args
    from .distributed import check_distributed_args
    from .hub import check_hub_args

    check_distributed_args(args)
    check_model_args(args)
    check_hub_args(args)


# What a Python caller may pass, where it is wider than the annotation. Annotations are what command-line
# parsers read (HfArgumentParser takes one type per flag: `str | None` plus nargs='?' for fsdp, a list for
# report_to); Python callers and config files may also pass fsdp=True or report_to="jsonl".
_VALUE_TYPES: dict[str, Any] = {
    "report_to": str | list[str] | None,
    "fsdp": bool | str | None,
    "include_num_input_tokens_seen": str | bool,
    # accelerate's ParallelismConfig object too, read by its attributes (args/distributed.py).
    "parallelism_config": Any,
    # transformers' or accelerate's AcceleratorConfig too, read by attribute (args/accelerator_config.py).
    "accelerator_config": Any,
    # HfArgumentParser gives None for an unset list flag; transformers reads it as [].
    "debug": str | list[str] | None,
}


def field_value_types(cls: type) -> dict[str, Any]:
    """The type of value each field of `cls` takes: its annotation, widened where `_VALUE_TYPES` says."""
    hints = typing.get_type_hints(cls)
    return {name: _VALUE_TYPES.get(name, hint) for name, hint in hints.items()}


@cache
def _field_hints() -> dict[str, Any]:
    return field_value_types(TrainingFields)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, Mapping)
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _check_types(args: TrainingFields) -> None:
    for name, hint in _field_hints().items():
        value = getattr(args, name)
        if not _matches(value, hint) and not (name == "output_dir" and value is None):
            raise ValueError(
                f"`{name}` must be of type {_type_name(hint)}, got {value!r} ({type(value).__name__}); "
                f"pass a {_type_name(hint)} value for `{name}`."
            )


def _normalise(args: TrainingFields) -> None:
    """Bring accepted spellings to one form: plain str/int/float/list/dict."""
    for name in _field_hints():
        value = getattr(args, name)
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
            value = int(value)  # numpy ints and the like, so to_json_string works
        elif isinstance(value, numbers.Real) and not isinstance(value, bool | int | float):
            value = float(value)
        elif isinstance(value, tuple):
            value = list(value)
        setattr(args, name, value)
    if args.output_dir is None:
        args.output_dir = "trainer_output"
    args.output_dir = os.path.expanduser(args.output_dir)
    if isinstance(args.lr_scheduler_kwargs, str):
        args.lr_scheduler_kwargs = _parse_json_object("lr_scheduler_kwargs", args.lr_scheduler_kwargs)
    elif isinstance(args.lr_scheduler_kwargs, Mapping):
        args.lr_scheduler_kwargs = dict(args.lr_scheduler_kwargs)
    # A command line gives these as strings: a JSON object is the value itself, anything else a file path.
    for name in ("fsdp_config", "deepspeed", "parallelism_config"):
        value = getattr(args, name)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            setattr(args, name, _parse_json_object(name, value))
    tokens_seen: str | bool = args.include_num_input_tokens_seen
    if isinstance(tokens_seen, str) and tokens_seen.lower() in ("true", "false"):
        tokens_seen = tokens_seen.lower() == "true"  # from a command line, as transformers' bool flag
    if isinstance(tokens_seen, bool):
        args.include_num_input_tokens_seen = "all" if tokens_seen else "no"
    if args.disable_tqdm is None:
        args.disable_tqdm = logging.getLogger("ember").getEffectiveLevel() > logging.WARNING
    args.report_to = _normalise_report_to(args.report_to)


def _parse_json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"`{name}` is not valid JSON ({err}); pass a dict or a JSON object.") from None
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a JSON object like '{{\"key\": 1}}', got {text!r}.")
    return value


DEBUG_OPTIONS: tuple[str, ...] = ("underflow_overflow", "tpu_metrics_debug")


def normalise_debug(value: str | list[str] | None) -> list[str]:
    """`debug` as transformers reads it: a space-separated string or a list of options, as a list."""
    names = value.split() if isinstance(value, str) else [str(getattr(v, "value", v)) for v in value or []]
    for name in names:
        if name == "tpu_metrics_debug":
            raise ValueError(
                "`debug`='tpu_metrics_debug' prints torch_xla's TPU metrics; ember does not run on TPUs. "
                "Remove it (debug='underflow_overflow' is supported)."
            )
        if name not in DEBUG_OPTIONS:
            raise ValueError(
                f"`debug`={name!r} is not a debug option.{_suggest(name, DEBUG_OPTIONS)} "
                "Use 'underflow_overflow' or leave it empty."
            )
    return list(dict.fromkeys(names))


def _check_accelerator_and_debug(args: TrainingFields) -> None:
    from .accelerator_config import normalise_accelerator_config

    config = normalise_accelerator_config(args.accelerator_config, args.gradient_accumulation_steps)
    num_steps = (config.gradient_accumulation_kwargs or {}).get("num_steps")
    if num_steps is not None:
        args.gradient_accumulation_steps = num_steps  # transformers: num_steps wins over the default 1
    # The annotation stays transformers' (what HfArgumentParser reads); the value is the checked config.
    args.accelerator_config = config  # type: ignore[assignment]
    args.debug = normalise_debug(args.debug)


def _normalise_report_to(value: str | list[str] | None) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    out: list[str] = []
    for name in names:
        if name == "none":
            continue
        if name == "all":
            out.extend(available_trackers())  # installed ones only, as transformers does
        elif name in REPORT_TO_BACKENDS:
            out.append(name)
        else:
            raise ValueError(
                f"report_to={name!r} is not supported by ember yet.{_suggest(name, REPORT_TO_BACKENDS)} "
                f"Use {', '.join(map(repr, REPORT_TO_BACKENDS))}, 'all' or 'none' in `report_to`, "
                "or log from a callback."
            )
    return list(dict.fromkeys(out))


def _choose(name: str, value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(
            f"`{name}`={value!r} is not {what} ember supports.{_suggest(value, choices)} "
            f"Choose one of: {', '.join(choices)}."
        )


def _check_choices(args: TrainingFields) -> None:
    _choose("lr_scheduler_type", args.lr_scheduler_type, SCHEDULER_TYPES, "a scheduler")
    _choose("optim", args.optim, OPTIMIZER_NAMES, "an optimizer")
    _choose("eval_strategy", args.eval_strategy, INTERVAL_STRATEGIES, "an eval strategy")
    _choose("logging_strategy", args.logging_strategy, INTERVAL_STRATEGIES, "a logging strategy")
    _choose("save_strategy", args.save_strategy, SAVE_STRATEGIES, "a save strategy")
    sampling = args.train_sampling_strategy
    _choose("train_sampling_strategy", sampling, TRAIN_SAMPLING_STRATEGIES, "a sampling strategy")
    mode = args.include_num_input_tokens_seen
    assert isinstance(mode, str)  # _normalise turned booleans into names
    _choose("include_num_input_tokens_seen", mode, TOKENS_SEEN_MODES, "a token-counting mode")
    for item in args.include_for_metrics:
        _choose("include_for_metrics", item, ("inputs", "loss"), "an extra input for metrics")


def _check_optimizer(args: TrainingFields) -> None:
    """What `optim` needs from the other fields; the optimizer's own options are checked where it is
    built (optim.py), where its package is imported."""
    name = args.optim
    if name in OPTIMIZERS_REFUSED:
        raise ValueError(f"`optim`={name!r} cannot run in ember: {OPTIMIZERS_REFUSED[name]}.")
    targets = args.optim_target_modules
    if name in LOW_RANK_OPTIMIZERS and not targets:
        raise ValueError(
            f"`optim`={name!r} projects the gradients of the modules that `optim_target_modules` names, "
            "and it is unset; set it to a regex, a list of module names, or 'all-linear'."
        )
    if targets is not None and name not in LOW_RANK_OPTIMIZERS:
        raise ValueError(
            f"`optim_target_modules` is read only by the galore_* and apollo_* optimizers, not by "
            f"optim={name!r}; unset it, or choose one of: {', '.join(LOW_RANK_OPTIMIZERS)}."
        )
    if name in BACKWARD_STEP_OPTIMIZERS:
        why = f"`optim`={name!r} updates each weight inside backward, as its gradient arrives"
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"{why}, so gradients cannot accumulate over micro-batches; set "
                f"gradient_accumulation_steps=1 (it is {args.gradient_accumulation_steps}), or choose "
                "another optimizer."
            )
        if args.fp16:
            raise ValueError(
                f"{why}, before fp16's loss scale could be taken off its gradient; use bf16=True, or "
                "another optimizer."
            )


def _fill_derived(args: TrainingFields) -> None:
    if args.eval_strategy != IntervalStrategy.NO:
        args.do_eval = True
    if args.eval_strategy == IntervalStrategy.STEPS and args.eval_steps is None:
        args.eval_steps = args.logging_steps
    needs_metric = args.load_best_model_at_end or args.lr_scheduler_type == SchedulerType.REDUCE_ON_PLATEAU
    if needs_metric and args.metric_for_best_model is None:
        args.metric_for_best_model = "loss"
    if args.greater_is_better is None and args.metric_for_best_model is not None:
        args.greater_is_better = not args.metric_for_best_model.endswith("loss")
    # transformers refuses this only when the Trainer is built; here it fails before any work starts.
    if args.save_strategy == SaveStrategy.BEST and args.metric_for_best_model is None:
        raise ValueError(
            "save_strategy='best' saves when `metric_for_best_model` improves, but metric_for_best_model is "
            "unset; set metric_for_best_model (e.g. 'loss' or 'eval_accuracy'), or set "
            "load_best_model_at_end=True to rank by 'loss'."
        )


def _at_least(args: TrainingFields, name: str, low: float, fix: str, optional: bool = False) -> None:
    value = getattr(args, name)
    if optional and value is None:
        return
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value!r}; {fix}.")


def _check_ranges(args: TrainingFields) -> None:
    _at_least(args, "learning_rate", 0, "use a non-negative learning rate")
    _at_least(args, "per_device_train_batch_size", 1, "use a batch size of at least 1")
    _at_least(args, "per_device_eval_batch_size", 1, "use a batch size of at least 1")
    _at_least(args, "gradient_accumulation_steps", 1, "use 1 for no accumulation")
    _at_least(args, "num_train_epochs", 0, "use a non-negative number of epochs")
    _at_least(args, "max_grad_norm", 0, "use 0 to turn clipping off")
    _at_least(args, "warmup_steps", 0, "use 0 for no warmup")
    _at_least(args, "weight_decay", 0, "use 0 for no weight decay")
    _at_least(args, "adam_epsilon", 0, "use a small positive value such as 1e-8")
    _at_least(args, "eval_delay", 0, "use 0 to evaluate from the start")
    _at_least(args, "save_total_limit", 1, "use None to keep every checkpoint", optional=True)
    _at_least(args, "eval_accumulation_steps", 1, "use None to keep predictions on the device", optional=True)
    _at_least(args, "dataloader_num_workers", 0, "use 0 to load data in the main process")
    _at_least(args, "loss_chunk_size", 1, "use a few hundred to a few thousand tokens, e.g. 1024")
    for name in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
        value = getattr(args, name)
        if not 0 <= value < 1:
            raise ValueError(f"`{name}` must be in [0, 1), got {value!r}; pick a value in that range.")
    for name in ("flops_per_token", "device_peak_flops"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"`{name}` must be > 0, got {value!r}; set it to a positive number or None.")
    if args.warmup_steps >= 1:
        args.warmup_steps = _whole("warmup_steps", args.warmup_steps)


def _whole(name: str, value: float) -> int:
    if value != int(value):
        raise ValueError(
            f"`{name}`={value!r}: a value >= 1 counts steps; use a whole number (or a ratio < 1)."
        )
    return int(value)


def _check_intervals(args: TrainingFields) -> None:
    strategies = (args.logging_strategy, args.eval_strategy, args.save_strategy)
    for name, strategy in zip(("logging_steps", "eval_steps", "save_steps"), strategies):
        if strategy != IntervalStrategy.STEPS:
            continue
        steps = getattr(args, name)
        strategy_name = name.replace("_steps", "_strategy")
        if steps is None or steps <= 0:
            raise ValueError(
                f"`{name}` must be > 0 when {strategy_name}='steps', got {steps!r}; set a positive step "
                f"count (or a ratio in (0, 1)), or change `{strategy_name}`."
            )
        if steps >= 1:
            setattr(args, name, _whole(name, steps))


def _check_best_model(args: TrainingFields) -> None:
    plateau = args.lr_scheduler_type == SchedulerType.REDUCE_ON_PLATEAU
    if plateau and args.eval_strategy == IntervalStrategy.NO:
        raise ValueError(
            "lr_scheduler_type='reduce_lr_on_plateau' steps on an eval metric but `eval_strategy` is 'no'; "
            "set eval_strategy to 'steps' or 'epoch'."
        )
    if not args.load_best_model_at_end:
        return
    if args.eval_strategy == IntervalStrategy.NO:
        raise ValueError(
            "`load_best_model_at_end` needs evaluations to rank checkpoints; set eval_strategy to "
            "'steps' or 'epoch' (and the same save_strategy), or turn load_best_model_at_end off."
        )
    if args.save_strategy == SaveStrategy.BEST:
        return
    if args.save_strategy != args.eval_strategy:
        raise ValueError(
            f"`load_best_model_at_end` needs save_strategy to match eval_strategy (or be 'best'), got "
            f"save_strategy={args.save_strategy!r} and eval_strategy={args.eval_strategy!r}; make them equal."
        )
    if args.eval_strategy == IntervalStrategy.STEPS:
        _check_save_multiple_of_eval(args.save_steps, args.eval_steps)


def _check_save_multiple_of_eval(save: float, ev: float | None) -> None:
    assert ev is not None  # filled from logging_steps by _fill_derived
    fix = "`load_best_model_at_end` needs `save_steps` to be a multiple of `eval_steps`"
    if (save < 1) != (ev < 1):
        raise ValueError(f"{fix}; use both as counts or both as ratios, got {save} and {ev}.")
    # Ratios are compared in millionths so 0.2 vs 0.1 is not spoilt by float rounding.
    scale = 1 if save >= 1 else 1_000_000
    if round(save * scale) % max(1, round(ev * scale)) != 0:
        raise ValueError(f"{fix}; got save_steps={save}, eval_steps={ev}.")


def _check_dataloader(args: TrainingFields) -> None:
    context = args.dataloader_multiprocessing_context
    if context is not None:
        import multiprocessing

        methods = tuple(multiprocessing.get_all_start_methods())
        if context not in methods:
            raise ValueError(
                f"`dataloader_multiprocessing_context`={context!r} is not a start method of this "
                f"platform; use one of {', '.join(methods)} or None."
            )
    if args.dataloader_num_workers > 0:
        _at_least(args, "dataloader_prefetch_factor", 1, "use at least 1 or None", optional=True)
        return
    if args.dataloader_prefetch_factor is not None:
        raise ValueError(
            "`dataloader_prefetch_factor` needs dataloader_num_workers > 0; set both or neither."
        )
    if args.dataloader_persistent_workers:
        raise ValueError(
            "`dataloader_persistent_workers` needs dataloader_num_workers > 0; set both or neither."
        )


def _check_log_levels(args: TrainingFields) -> None:
    _choose("log_level", args.log_level, LOG_LEVEL_NAMES, "a log level")
    _choose("log_level_replica", args.log_level_replica, LOG_LEVEL_NAMES, "a log level")


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _check_hardware(args: TrainingFields) -> None:
    if args.fp16 and args.bf16:
        raise ValueError("`fp16` and `bf16` are both set; choose one (bf16 where the hardware supports it).")
    if args.fp16 and (args.use_cpu or not _cuda_available()):
        raise ValueError(
            "`fp16` needs a CUDA GPU and none is in use; use bf16=True instead, or run on a GPU."
        )
    if args.tf32 and (args.use_cpu or not _cuda_available()):
        raise ValueError("`tf32` needs an NVIDIA GPU (Ampere or newer) and none is in use; leave tf32 unset.")


def _check_reliability(args: TrainingFields) -> None:
    """Values that pass the range checks yet break a run later: NaN, infinity, an unusable output_dir;
    and the step guards' fields (ember/engine/guards.py)."""
    for name in ("learning_rate", "max_grad_norm", "weight_decay", "warmup_steps", "adam_epsilon"):
        if math.isnan(getattr(args, name)):
            raise ValueError(f"`{name}` is NaN; set it to a number (max_grad_norm: 0 turns clipping off).")
    for name in ("learning_rate", "max_grad_norm", "num_train_epochs"):
        if math.isinf(getattr(args, name)):
            raise ValueError(
                f"`{name}`={getattr(args, name)} is infinite; set a finite number "
                "(for an open-ended run, set max_steps and stop it with a callback)."
            )
    if math.isnan(args.num_train_epochs):
        raise ValueError("`num_train_epochs` is NaN; set a number of epochs (or max_steps).")
    if not str(args.output_dir).strip():
        raise ValueError("`output_dir` is empty; name a folder for checkpoints and logs (or leave it unset).")
    if os.path.isfile(args.output_dir):
        raise ValueError(f"`output_dir`={args.output_dir!r} is a file; point output_dir at a folder.")
    _choose("nonfinite_step_policy", args.nonfinite_step_policy, NONFINITE_POLICIES, "a policy")
    _at_least(args, "max_consecutive_nonfinite_steps", 1, "use 1 to stop at the first run of them")
    _at_least(args, "loss_spike_window", 2, "use at least 2 steps so a standard deviation exists")
    stall = args.peer_stall_timeout
    if not (isinstance(stall, int | float) and math.isfinite(stall) and stall >= 0):
        raise ValueError(
            f"`peer_stall_timeout` must be a number of seconds >= 0, got {stall!r}; use 0 to turn the "
            "stuck-rank check off."
        )
    z = args.loss_spike_zscore
    if z is not None and not (math.isfinite(z) and z > 0):
        raise ValueError(
            f"`loss_spike_zscore` must be a positive number of standard deviations (e.g. 6), got {z!r}; "
            "or None to turn spike rollback off."
        )
