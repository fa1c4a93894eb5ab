"""`TrainingArguments`: every knob of a training run, with the names and defaults of transformers 5.x.

Only fields that ember implements exist here. A transformers field that ember does not implement is an
error naming it (`UnsupportedFieldError`), never silently ignored; a misspelt name is an error with a
suggestion (`UnknownFieldError`). Every value is checked once, in `validate`, when the object is built.

This module imports nothing heavy: torch is imported only when a check or property needs the device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import difflib
import json
import logging
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING, Any

from ember.integrations import TRACKER_NAMES, available_trackers

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

_logger = logging.getLogger("ember.args")

# fmt: off
__all__ = [
    "FieldNameError", "HF_ONLY_FIELDS", "IntervalStrategy", "OptimizerNames", "ParallelMode", "SaveStrategy",
    "SchedulerType", "TrainingArguments", "UNSUPPORTED_HF_FIELDS", "UnknownFieldError",
    "UnsupportedFieldError", "check_eval_dataset", "check_field_names", "check_supported_values",
    "field_value_types", "validate",
]
# fmt: on


class IntervalStrategy(str, Enum):
    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"


class SaveStrategy(str, Enum):
    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"
    BEST = "best"


class SchedulerType(str, Enum):
    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    INVERSE_SQRT = "inverse_sqrt"
    REDUCE_ON_PLATEAU = "reduce_lr_on_plateau"
    COSINE_WITH_MIN_LR = "cosine_with_min_lr"
    WARMUP_STABLE_DECAY = "warmup_stable_decay"


class ParallelMode(Enum):
    """How this run is spread over devices, with the members and values of transformers' ParallelMode.

    ember never uses single-process multi-GPU (DataParallel), so it is DISTRIBUTED or NOT_PARALLEL.
    """

    NOT_PARALLEL = "not_parallel"
    NOT_DISTRIBUTED = "not_distributed"
    DISTRIBUTED = "distributed"

    # Scripts compare `args.parallel_mode == ParallelMode.DISTRIBUTED` with transformers' enum imported;
    # a member equals the member of any enum named ParallelMode with the same value.
    def __eq__(self, other: object) -> bool:
        if isinstance(other, Enum) and type(other).__name__ == "ParallelMode":
            return bool(self.value == other.value)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.value)


class OptimizerNames(str, Enum):
    ADAMW_TORCH = "adamw_torch"
    ADAMW_TORCH_FUSED = "adamw_torch_fused"
    SGD = "sgd"
    ADAGRAD = "adagrad"
    RMSPROP = "rmsprop"
    ADAFACTOR = "adafactor"


INTERVAL_STRATEGIES: tuple[str, ...] = tuple(m.value for m in IntervalStrategy)
SAVE_STRATEGIES: tuple[str, ...] = tuple(m.value for m in SaveStrategy)
SCHEDULER_TYPES: tuple[str, ...] = tuple(m.value for m in SchedulerType)
OPTIMIZER_NAMES: tuple[str, ...] = tuple(m.value for m in OptimizerNames)
TRAIN_SAMPLING_STRATEGIES: tuple[str, ...] = ("random", "sequential", "group_by_length")
TOKENS_SEEN_MODES: tuple[str, ...] = ("no", "all", "non_padding")
REPORT_TO_BACKENDS: tuple[str, ...] = TRACKER_NAMES  # the registry in ember.integrations owns the names

# Fields of transformers 5.24's TrainingArguments that ember does not implement, each with what to do instead.
# They are real dataclass fields at transformers' defaults (declared at the end of the class), so that a
# transformers script's `HfArgumentParser`, `args.push_to_hub` reads and `TrainingArguments(**hf.to_dict())`
# all work; `validate` refuses any other value with `UnsupportedFieldError`. Supporting one means deleting
# its entry here and implementing it. tests/test_args.py compares the defaults with installed transformers.
_GENERIC_FIX = "leave it at its default"
# fmt: off
HF_ONLY_FIELDS: dict[str, str] = {
    "optim_target_modules": "use an optimizer that needs no target modules",
    "average_tokens_across_devices": "ember always normalises the loss by the tokens of all ranks",
    "bf16_full_eval": "evaluation runs under the training precision (bf16=True autocasts it)",
    "fp16_full_eval": "evaluation runs under the training precision",
    "activation_checkpointing": "call model.gradient_checkpointing_enable() before building the Trainer",
    "activation_checkpointing_kwargs": "pass the options to model.gradient_checkpointing_enable() yourself",
    "gradient_checkpointing": "call model.gradient_checkpointing_enable() before building the Trainer",
    "gradient_checkpointing_kwargs": "pass the options to model.gradient_checkpointing_enable() yourself",
    "torch_compile": "compile the model yourself (model.compile()) before building the Trainer",
    "torch_compile_backend": "compile the model yourself (model.compile(backend=...))",
    "torch_compile_mode": "compile the model yourself (model.compile(mode=...))",
    "use_liger_kernel": "apply Liger kernels to the model yourself before building the Trainer",
    "liger_kernel_config": "apply Liger kernels to the model yourself before building the Trainer",
    "use_cache": "set model.config.use_cache yourself",
    "neftune_noise_alpha": "add NEFTune noise in the model's embedding forward yourself",
    "torch_empty_cache_steps": "call torch.cuda.empty_cache() from a callback's on_step_end",
    "auto_find_batch_size": "pick per_device_train_batch_size yourself",
    "project": "name the project in your tracker's own settings",
    "trackio_space_id": "trackio is not a report_to backend of ember",
    "trackio_bucket_id": "trackio is not a report_to backend of ember",
    "trackio_static_space_id": "trackio is not a report_to backend of ember",
    "eval_do_concat_batches": "use batch_eval_metrics=True to avoid holding all predictions",
    "eval_use_gather_object": "ember gathers tensors only",
    "save_on_each_node": "ember saves on the global main process only; use a shared file system",
    "enable_jit_checkpoint": "ember saves a checkpoint on SIGTERM by itself (see ember/preemption.py)",
    "push_to_hub": "upload output_dir with huggingface_hub's upload_folder after training",
    "hub_token": "upload output_dir with huggingface_hub after training",
    "hub_private_repo": "upload output_dir with huggingface_hub after training",
    "hub_model_id": "upload output_dir with huggingface_hub after training",
    "hub_strategy": "upload output_dir with huggingface_hub after training",
    "hub_always_push": "upload output_dir with huggingface_hub after training",
    "hub_revision": "upload output_dir with huggingface_hub after training",
    "accelerator_config": "ember does not use accelerate; its loop has no such options",
    "parallelism_config": "use fsdp/fsdp_config or ddp_* fields",
    "dataloader_multiprocessing_context": "set torch.multiprocessing's start method in your script",
    "dataloader_in_order": "ember's samplers always yield batches in order",
    "ddp_static_graph": "ember wraps DDP without static_graph",
    "debug": "use torch's anomaly detection (torch.autograd.set_detect_anomaly) yourself",
    "skip_memory_metrics": "ember does not report memory metrics",
}
# fmt: on
UNSUPPORTED_HF_FIELDS: frozenset[str] = frozenset(HF_ONLY_FIELDS)

# Other values that mean "the default", as transformers' own `to_dict()` writes them: it resolves
# gradient_checkpointing None -> False, debug "" -> [], accelerator_config None -> a dict of its defaults,
# and masks tokens. They are accepted and stored as the declared default.
_DEFAULT_SPELLINGS: dict[str, tuple[Any, ...]] = {
    "activation_checkpointing": (False,),
    "gradient_checkpointing": (False,),
    "debug": ([], None),
    "hub_token": ("<HUB_TOKEN>",),
    "accelerator_config": (
        {
            "split_batches": False,
            "dispatch_batches": None,
            "even_batches": True,
            "use_seedable_sampler": True,
            "non_blocking": False,
            "gradient_accumulation_kwargs": None,
        },
    ),
}

# transformers' log level names; "passive" leaves the level as it is.
# fmt: off
LOG_LEVELS: dict[str, int] = {
    "detail": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
    "error": logging.ERROR, "critical": logging.CRITICAL, "passive": -1,
}
# fmt: on
LOG_LEVEL_NAMES: tuple[str, ...] = tuple(LOG_LEVELS)

# Names that older transformers releases accepted; difflib alone would point users somewhere odd.
_MOVED_FIELDS: dict[str, str] = {
    "evaluation_strategy": "It was renamed `eval_strategy`",
    "warmup_ratio": "Pass the ratio as `warmup_steps` (a value in [0, 1) is read as a ratio)",
    "no_cuda": "Use `use_cpu=True`",
    "per_gpu_train_batch_size": "Use `per_device_train_batch_size`",
    "per_gpu_eval_batch_size": "Use `per_device_eval_batch_size`",
    "overwrite_output_dir": "Remove it; ember writes into `output_dir` and resumes only when asked",
    "logging_dir": "Remove it (as in transformers 5); for TensorBoard set TENSORBOARD_LOGGING_DIR",
}


class FieldNameError(TypeError, ValueError):
    """A keyword that is not a field. TypeError like any bad keyword; ValueError for config-file callers."""


class UnknownFieldError(FieldNameError):
    """The name is not a field of TrainingArguments (usually a typo)."""


class UnsupportedFieldError(FieldNameError):
    """The name is a transformers TrainingArguments field that ember does not implement yet."""


def _suggest(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


@cache
def _init_field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls) if f.init)


def check_field_names(names: Iterable[str], cls: type | None = None) -> None:
    """Raise `UnsupportedFieldError` / `UnknownFieldError` for the first name that `cls` cannot take."""
    cls = TrainingArguments if cls is None else cls
    known = _init_field_names(cls)
    for name in names:
        if name in known:
            continue
        hint = f" {_MOVED_FIELDS[name]}." if name in _MOVED_FIELDS else _suggest(name, known)
        raise UnknownFieldError(f"`{name}` is not a field of {cls.__name__}.{hint}")


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainingArguments:
    """Arguments of a training run. Field names and defaults follow transformers 5.x."""

    # --- Output ---
    # Typed `str`: __post_init__ replaces None, so code reading args.output_dir never sees None.
    output_dir: str = _f(None, "Folder for checkpoints and logs ('trainer_output' if unset).")
    # --- Duration and batch size ---
    per_device_train_batch_size: int = _f(8, "Training samples per batch on each device.")
    num_train_epochs: float = _f(3.0, "Passes over the training set; may be fractional.")
    max_steps: int = _f(-1, "Optimizer steps to run; if > 0 it wins over num_train_epochs.")
    # --- Learning rate and scheduler ---
    learning_rate: float = _f(5e-5, "Peak learning rate, reached at the end of warmup.")
    lr_scheduler_type: str = _f("linear", "Shape of the learning-rate schedule.", choices=SCHEDULER_TYPES)
    lr_scheduler_kwargs: dict[str, Any] | str | None = _f(None, "Scheduler options: a dict or JSON object.")
    warmup_steps: float = _f(0, "Warmup length: steps if >= 1, else a ratio of all steps.")
    # --- Optimizer ---
    optim: str = _f("adamw_torch_fused", "Optimizer to build.", choices=OPTIMIZER_NAMES)
    optim_args: str | None = _f(None, "Extra optimizer options as 'key=value,key2=value2'.")
    weight_decay: float = _f(0.0, "Decoupled weight decay; biases and norm weights never decay.")
    adam_beta1: float = _f(0.9, "Adam-family decay rate of the gradient mean.")
    adam_beta2: float = _f(0.999, "Adam-family decay rate of the squared-gradient mean.")
    adam_epsilon: float = _f(1e-8, "Adam-family term that keeps the denominator away from zero.")
    # --- Stability ---
    gradient_accumulation_steps: int = _f(1, "Micro-batches summed into one optimizer step.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this; 0 turns clipping off.")
    label_smoothing_factor: float = _f(0.0, "Label smoothing of the loss, in [0, 1).")
    # --- Precision ---
    bf16: bool = _f(False, "Compute in bfloat16 mixed precision.")
    fp16: bool = _f(False, "Compute in float16 mixed precision with loss scaling (CUDA only).")
    tf32: bool | None = _f(None, "Allow TensorFloat-32 matmuls (NVIDIA Ampere+); unset keeps torch's choice.")
    # --- Logging ---
    logging_strategy: str = _f("steps", "When to log training metrics.", choices=INTERVAL_STRATEGIES)
    logging_steps: float = _f(500, "Steps between logs; a value < 1 is a ratio of all steps.")
    logging_first_step: bool = _f(False, "Also log after the first optimizer step.")
    logging_nan_inf_filter: bool = _f(True, "Leave NaN/inf losses out of the logged loss.")
    include_num_input_tokens_seen: str = _f(
        "no", "Count input tokens seen: 'no', 'all', 'non_padding' (true means 'all', false 'no')."
    )
    log_level: str = _f(
        "passive", "Level of the 'ember' logger on the main process.", choices=LOG_LEVEL_NAMES
    )
    log_level_replica: str = _f(
        "warning", "Level of the 'ember' logger on other ranks.", choices=LOG_LEVEL_NAMES
    )
    log_on_each_node: bool = _f(True, "should_log on each machine's main process, not only on rank 0.")
    disable_tqdm: bool | None = _f(None, "Print logs instead of progress bars; unset means bars.")
    report_to: list[str] | None = _f("none", "Log backends: 'none', 'all', or a list such as 'jsonl'.")
    run_name: str | None = _f(None, "Name of the run, shown by logging backends.")
    # --- Evaluation ---
    eval_strategy: str = _f("no", "When to evaluate during training.", choices=INTERVAL_STRATEGIES)
    eval_steps: float | None = _f(None, "Steps between evaluations (default logging_steps); < 1 is a ratio.")
    eval_delay: float = _f(0, "Epochs or steps to wait before the first evaluation.")
    per_device_eval_batch_size: int = _f(8, "Evaluation samples per batch on each device.")
    prediction_loss_only: bool = _f(False, "Evaluation and prediction return only the loss.")
    eval_on_start: bool = _f(False, "Evaluate once before the first step, as a smoke test.")
    eval_accumulation_steps: int | None = _f(None, "Move predictions to the CPU every this many eval steps.")
    include_for_metrics: list[str] = field(
        default_factory=list, metadata={"help": "Extra inputs of compute_metrics: 'inputs' and/or 'loss'."}
    )
    batch_eval_metrics: bool = _f(False, "Call compute_metrics per batch, to bound memory.")
    # --- Checkpoints ---
    save_only_model: bool = _f(False, "Save weights only (no optimizer/scheduler/RNG: no exact resume).")
    save_strategy: str = _f("steps", "When to save a checkpoint.", choices=SAVE_STRATEGIES)
    save_steps: float = _f(500, "Steps between checkpoints; a value < 1 is a ratio of all steps.")
    save_total_limit: int | None = _f(None, "Keep at most this many checkpoints (always the best one).")
    # --- Best model ---
    load_best_model_at_end: bool = _f(False, "Reload the best checkpoint when training ends.")
    metric_for_best_model: str | None = _f(None, "Metric that ranks checkpoints ('loss' when needed).")
    greater_is_better: bool | None = _f(None, "Larger metric is better; unset: unless it ends in 'loss'.")
    # --- Resume ---
    ignore_data_skip: bool = _f(False, "On resume, restart the data at the start of the epoch.")
    restore_callback_states_from_checkpoint: bool = _f(False, "On resume, restore callback states.")
    # --- Reproducibility ---
    full_determinism: bool = _f(False, "Deterministic kernels everywhere (slower); for debugging.")
    seed: int = _f(42, "Seed of the python, numpy and torch generators.")
    data_seed: int | None = _f(None, "Seed of the data order (default: seed).")
    # --- Hardware ---
    use_cpu: bool = _f(False, "Train on the CPU even when a GPU is present.")
    # --- Distributed (launch with torchrun; see ember/distributed) ---
    ddp_backend: str | None = _f(None, "Process-group backend; unset: nccl (+gloo) on GPUs, gloo on CPU.")
    ddp_timeout: int = _f(1800, "Seconds a collective waits for the other ranks before failing.")
    ddp_find_unused_parameters: bool | None = _f(None, "DDP find_unused_parameters; unset means False.")
    ddp_bucket_cap_mb: int | None = _f(None, "DDP gradient bucket size in MB; unset: torch's 25.")
    ddp_broadcast_buffers: bool | None = _f(None, "DDP broadcast_buffers; unset means True.")
    fsdp: str | None = _f(
        None, "Shard the model with FSDP2 (True, or e.g. 'full_shard offload').", nargs="?", const=True
    )
    fsdp_config: dict[str, Any] | str | None = _f(None, "FSDP options: a dict or the path of a JSON file.")
    deepspeed: dict[str, Any] | str | None = _f(None, "DeepSpeed config: a dict or a JSON file path.")
    # --- Data loading ---
    dataloader_drop_last: bool = _f(False, "Drop the last, smaller batch of each epoch.")
    dataloader_num_workers: int = _f(0, "Data-loading worker processes; 0 loads in the main process.")
    dataloader_pin_memory: bool = _f(True, "Pin batch memory for faster copies to the GPU.")
    dataloader_persistent_workers: bool = _f(False, "Keep worker processes alive between epochs.")
    dataloader_prefetch_factor: int | None = _f(None, "Batches each worker loads ahead.")
    remove_unused_columns: bool = _f(True, "Drop dataset columns the model's forward does not take.")
    label_names: list[str] | None = _f(None, "Input keys that hold the labels.")
    train_sampling_strategy: str = _f("random", "Order of samples.", choices=TRAIN_SAMPLING_STRATEGIES)
    length_column_name: str = _f("length", "Column of precomputed lengths, for group_by_length.")
    # --- Flags for your scripts (the Trainer does not read them) ---
    do_train: bool = _f(False, "For scripts: whether to train.")
    do_eval: bool = _f(False, "For scripts: whether to evaluate (set when eval_strategy is not 'no').")
    do_predict: bool = _f(False, "For scripts: whether to predict.")
    resume_from_checkpoint: str | None = _f(None, "For scripts: a checkpoint folder to resume from.")
    local_rank: int = _f(-1, "Rank of this process on its machine, from the launcher; -1 if not distributed.")
    # --- ember only ---
    save_async: bool = _f(False, "Write checkpoints in a background thread while training goes on.")
    verify_checkpoints: bool = _f(False, "On resume, re-hash every checkpoint file against its manifest.")
    flops_per_token: float | None = _f(None, "Model FLOPs per token, to report FLOPs utilisation (MFU).")
    device_peak_flops: float | None = _f(None, "Peak FLOP/s of one device, to report MFU.")
    chunked_loss: bool = _f(
        False,
        "Causal LMs: compute the training loss from the last hidden states and the output head in chunks "
        "of `loss_chunk_size` tokens, never holding the full logits (same loss and gradients). Falls back "
        "to the plain loss, with a notice, where it cannot apply.",
    )
    loss_chunk_size: int = _f(1024, "Tokens per chunk of the chunked loss (chunked_loss=True).")
    # --- transformers fields accepted only at these defaults (HF_ONLY_FIELDS says what to do instead) ---
    optim_target_modules: str | None = _f(None, "Not supported by ember; leave unset.")
    average_tokens_across_devices: bool = _f(True, "Not supported by ember (it always averages); leave True.")
    bf16_full_eval: bool = _f(False, "Not supported by ember; leave False.")
    fp16_full_eval: bool = _f(False, "Not supported by ember; leave False.")
    activation_checkpointing: bool | None = _f(
        None, "Not supported by ember; leave unset.", nargs="?", const=True
    )
    activation_checkpointing_kwargs: dict[str, Any] | str | None = _f(
        None, "Not supported by ember; leave unset."
    )
    gradient_checkpointing: bool | None = _f(
        None, "Not supported by ember; leave unset.", nargs="?", const=True
    )
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = _f(
        None, "Not supported by ember; leave unset."
    )
    torch_compile: bool = _f(False, "Not supported by ember (compile the model yourself); leave False.")
    torch_compile_backend: str | None = _f(None, "Not supported by ember; leave unset.")
    torch_compile_mode: str | None = _f(None, "Not supported by ember; leave unset.")
    use_liger_kernel: bool = _f(False, "Not supported by ember; leave False.")
    liger_kernel_config: dict[str, bool] | str | None = _f(None, "Not supported by ember; leave unset.")
    use_cache: bool = _f(False, "Not supported by ember (set model.config.use_cache); leave False.")
    neftune_noise_alpha: float | None = _f(None, "Not supported by ember; leave unset.")
    torch_empty_cache_steps: int | None = _f(None, "Not supported by ember; leave unset.")
    auto_find_batch_size: bool = _f(False, "Not supported by ember; leave False.")
    project: str = _f("huggingface", "Not supported by ember; leave 'huggingface'.")
    trackio_space_id: str | None = _f(None, "Not supported by ember; leave unset.")
    trackio_bucket_id: str | None = _f(None, "Not supported by ember; leave unset.")
    trackio_static_space_id: str | None = _f(None, "Not supported by ember; leave unset.")
    eval_do_concat_batches: bool = _f(True, "Not supported by ember; leave True.")
    eval_use_gather_object: bool = _f(False, "Not supported by ember; leave False.")
    save_on_each_node: bool = _f(False, "Not supported by ember (saves on the main process); leave False.")
    enable_jit_checkpoint: bool = _f(False, "Not supported by ember; leave False.")
    push_to_hub: bool = _f(False, "Not supported by ember (upload output_dir yourself); leave False.")
    hub_token: str | None = _f(None, "Not supported by ember; leave unset.")
    hub_private_repo: bool | None = _f(None, "Not supported by ember; leave unset.")
    hub_model_id: str | None = _f(None, "Not supported by ember; leave unset.")
    hub_strategy: str = _f("every_save", "Not supported by ember; leave 'every_save'.")
    hub_always_push: bool = _f(False, "Not supported by ember; leave False.")
    hub_revision: str | None = _f(None, "Not supported by ember; leave unset.")
    accelerator_config: dict[str, Any] | str | None = _f(None, "Not supported by ember; leave unset.")
    # transformers types it as accelerate's ParallelismConfig; `str | None` keeps argparse working without
    # importing accelerate, and only None is accepted anyway.
    parallelism_config: str | None = _f(None, "Not supported by ember; leave unset.")
    dataloader_multiprocessing_context: str | None = _f(None, "Not supported by ember; leave unset.")
    dataloader_in_order: bool = _f(True, "Not supported by ember (always in order); leave True.")
    ddp_static_graph: bool | None = _f(None, "Not supported by ember; leave unset.")
    debug: str | list[str] = _f("", "Not supported by ember; leave empty.")
    skip_memory_metrics: bool = _f(True, "Not supported by ember (no memory metrics); leave True.")

    # Check keyword names before the generated __init__ so a typo gets a suggestion, also in subclasses.
    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        if kwargs:
            check_field_names(kwargs, cls)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        validate(self)
        # As transformers' Trainer does with its own logger; "passive" leaves the level alone.
        if LOG_LEVELS[self.log_level if self.should_log else self.log_level_replica] != -1:
            logging.getLogger("ember").setLevel(self.get_process_log_level())

    # The launcher's view (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK); one process when unset.
    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE") or 1)

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK") or 0)

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK") or (self.local_rank if self.local_rank >= 0 else 0))

    @property
    def should_log(self) -> bool:
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    @property
    def should_save(self) -> bool:
        return self.process_index == 0

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    @property
    def device(self) -> torch.device:
        import torch

        if self.use_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        launched = "LOCAL_RANK" in os.environ or self.local_rank >= 0
        return torch.device("cuda", self.local_process_index) if launched else torch.device("cuda")

    @property
    def n_gpu(self) -> int:
        return 1 if self.device.type == "cuda" else 0

    @property
    def parallel_mode(self) -> ParallelMode:
        return ParallelMode.DISTRIBUTED if self.world_size > 1 else ParallelMode.NOT_PARALLEL

    @property
    def ddp_timeout_delta(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.ddp_timeout)

    def get_process_log_level(self) -> int:
        """The `logging` level for this process (log_level on the main one, else log_level_replica).

        "passive" means the 'ember' logger's current level. Scripts pass the result to
        `logging`/`datasets`/`transformers` verbosity setters.
        """
        level = LOG_LEVELS[self.log_level if self.should_log else self.log_level_replica]
        return logging.getLogger("ember").getEffectiveLevel() if level == -1 else level

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work") -> Iterator[None]:
        """Run the body on the main process first (each machine's if `local`), the other ranks after it.

        For work that caches its result, like `datasets.map`. The others wait on a barrier of the default
        process group; without one (a single process, or before the group is set up) this does nothing.
        """
        import torch.distributed as dist

        if self.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            yield
            return
        is_main = (self.local_process_index if local else self.process_index) == 0
        if not is_main:
            _logger.debug("rank %d waits for the main process to do %s", self.process_index, desc)
            dist.barrier()
        try:
            yield
        finally:
            if is_main:
                _logger.debug("rank %d finished %s; releasing the other ranks", self.process_index, desc)
                dist.barrier()

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup length in steps: `warmup_steps` itself when >= 1, else that ratio of the run, rounded up."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        """The init fields as plain JSON-able values (enums as strings, containers copied)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = value.value if isinstance(value, Enum) else copy.deepcopy(value)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """`to_dict()` plus the batch sizes, with every value a bool/int/float/str (for hparams tables)."""
        d = {
            **self.to_dict(),
            "train_batch_size": self.train_batch_size,
            "eval_batch_size": self.eval_batch_size,
        }
        return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in d.items()}

    # Grouped setters, as transformers' (same parameters and defaults, same fields set). Each one builds
    # a validated copy first, so a bad value raises and leaves these arguments unchanged.
    def _update(self, **changes: Any) -> Self:
        checked = dataclasses.replace(self, **changes)
        self.__dict__.update(checked.__dict__)
        return self

    def set_training(
        self,
        learning_rate: float = 5e-5,
        batch_size: int = 8,
        weight_decay: float = 0,
        num_epochs: float = 3,
        max_steps: int = -1,
        gradient_accumulation_steps: int = 1,
        seed: int = 42,
        activation_checkpointing: bool = False,
        gradient_checkpointing: bool | None = None,
    ) -> Self:
        if gradient_checkpointing is not None:  # transformers' old name wins when given
            activation_checkpointing = gradient_checkpointing
        return self._update(
            do_train=True,
            learning_rate=learning_rate,
            per_device_train_batch_size=batch_size,
            weight_decay=weight_decay,
            num_train_epochs=num_epochs,
            max_steps=max_steps,
            gradient_accumulation_steps=gradient_accumulation_steps,
            seed=seed,
            activation_checkpointing=activation_checkpointing,
            gradient_checkpointing=activation_checkpointing,
        )

    def set_evaluate(
        self,
        strategy: str | IntervalStrategy = "no",
        steps: int = 500,
        batch_size: int = 8,
        accumulation_steps: int | None = None,
        delay: float | None = None,
        loss_only: bool = False,
    ) -> Self:
        strategy = IntervalStrategy(strategy).value if isinstance(strategy, str) else strategy
        return self._update(
            eval_strategy=strategy,
            do_eval=strategy != IntervalStrategy.NO,
            eval_steps=steps,
            per_device_eval_batch_size=batch_size,
            eval_accumulation_steps=accumulation_steps,
            eval_delay=0 if delay is None else delay,  # transformers stores None and reads it as 0
            prediction_loss_only=loss_only,
        )

    def set_testing(self, batch_size: int = 8, loss_only: bool = False) -> Self:
        return self._update(
            do_predict=True, per_device_eval_batch_size=batch_size, prediction_loss_only=loss_only
        )

    def set_save(
        self,
        strategy: str | SaveStrategy = "steps",
        steps: int = 500,
        total_limit: int | None = None,
        on_each_node: bool = False,
    ) -> Self:
        return self._update(
            save_strategy=strategy,
            save_steps=steps,
            save_total_limit=total_limit,
            save_on_each_node=on_each_node,
        )

    def set_logging(
        self,
        strategy: str | IntervalStrategy = "steps",
        steps: int = 500,
        report_to: str | list[str] = "none",
        level: str = "passive",
        first_step: bool = False,
        nan_inf_filter: bool = False,
        on_each_node: bool = False,
        replica_level: str = "passive",
    ) -> Self:
        return self._update(
            logging_strategy=strategy,
            logging_steps=steps,
            report_to=report_to,
            log_level=level,
            logging_first_step=first_step,
            logging_nan_inf_filter=nan_inf_filter,
            log_on_each_node=on_each_node,
            log_level_replica=replica_level,
        )

    def set_push_to_hub(
        self,
        model_id: str,
        strategy: str = "every_save",
        token: str | None = None,
        private_repo: bool | None = None,
        always_push: bool = False,
        revision: str | None = None,
    ) -> Self:
        """Refused with the push_to_hub explanation: ember does not push to the Hub."""
        return self._update(
            push_to_hub=True,
            hub_model_id=model_id,
            hub_strategy=strategy,
            hub_token=token,
            hub_private_repo=private_repo,
            hub_always_push=always_push,
            hub_revision=revision,
        )

    def set_optimizer(
        self,
        name: str | OptimizerNames = "adamw_torch",
        learning_rate: float = 5e-5,
        weight_decay: float = 0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        args: str | None = None,
    ) -> Self:
        return self._update(
            optim=name,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            adam_beta1=beta1,
            adam_beta2=beta2,
            adam_epsilon=epsilon,
            optim_args=args,
        )

    def set_lr_scheduler(
        self,
        name: str | SchedulerType = "linear",
        num_epochs: float = 3.0,
        max_steps: int = -1,
        warmup_steps: float = 0,
    ) -> Self:
        return self._update(
            lr_scheduler_type=name,
            num_train_epochs=num_epochs,
            max_steps=max_steps,
            warmup_steps=warmup_steps,
        )

    def set_dataloader(
        self,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
        in_order: bool = True,
        auto_find_batch_size: bool = False,
        ignore_data_skip: bool = False,
        sampler_seed: int | None = None,
    ) -> Self:
        return self._update(
            per_device_train_batch_size=train_batch_size,
            per_device_eval_batch_size=eval_batch_size,
            dataloader_drop_last=drop_last,
            dataloader_num_workers=num_workers,
            dataloader_pin_memory=pin_memory,
            dataloader_persistent_workers=persistent_workers,
            dataloader_prefetch_factor=prefetch_factor,
            dataloader_multiprocessing_context=multiprocessing_context,
            dataloader_in_order=in_order,
            auto_find_batch_size=auto_find_batch_size,
            ignore_data_skip=ignore_data_skip,
            data_seed=sampler_seed,
        )


def check_eval_dataset(args: TrainingArguments, has_eval_dataset: bool) -> None:
    """Called by the Trainer: evaluating during training needs an eval set."""
    if args.eval_strategy != IntervalStrategy.NO and not has_eval_dataset:
        raise ValueError(
            f"eval_strategy={args.eval_strategy!r} evaluates during training but no eval_dataset was given; "
            "pass eval_dataset to the Trainer or set eval_strategy='no'."
        )


# ---------------------------------------------------------------------------------------------------------
# Validation


def validate(args: TrainingArguments) -> None:
    """Check every field and fill in the derived defaults, in place.

    Raises ValueError (naming the field and the fix) for any bad value. Runs from `__post_init__`.
    """
    _check_hf_only(args)
    _check_types(args)
    _normalise(args)
    _check_choices(args)
    _fill_derived(args)
    _check_ranges(args)
    _check_intervals(args)
    _check_best_model(args)
    _check_dataloader(args)
    _check_log_levels(args)
    _check_hardware(args)
    from .distributed.options import check_distributed_args

    check_distributed_args(args)


# What a Python caller may pass, where it is wider than the annotation. Annotations are what command-line
# parsers read (HfArgumentParser takes one type per flag: `str | None` plus nargs='?' for fsdp, a list for
# report_to); Python callers and config files may also pass fsdp=True or report_to="jsonl".
_VALUE_TYPES: dict[str, Any] = {
    "report_to": str | list[str] | None,
    "fsdp": bool | str | None,
    "include_num_input_tokens_seen": str | bool,
}


def field_value_types(cls: type) -> dict[str, Any]:
    """The type of value each field of `cls` takes: its annotation, widened where `_VALUE_TYPES` says."""
    hints = typing.get_type_hints(cls)
    return {name: _VALUE_TYPES.get(name, hint) for name, hint in hints.items()}


@cache
def _field_hints() -> dict[str, Any]:
    return field_value_types(TrainingArguments)


def _is_hf_default(name: str, value: Any, default: Any) -> bool:
    spellings = (default, *_DEFAULT_SPELLINGS.get(name, ()))
    # Compare types too, so 0 does not pass for False nor 1 for True.
    return any(value is s or (type(value) is type(s) and value == s) for s in spellings)


def unsupported_value_error(name: str, value: Any) -> UnsupportedFieldError:
    """The one message for a transformers-only field set away from its default, on every entry path."""
    default = TrainingArguments.__dataclass_fields__[name].default
    return UnsupportedFieldError(
        f"`{name}`={value!r}: ember does not implement this transformers TrainingArguments option. "
        f"Leave it at its default ({default!r}) or remove it; instead, {HF_ONLY_FIELDS[name]}."
    )


def check_supported_values(values: Mapping[str, Any], cls: type | None = None) -> None:
    """Raise `UnsupportedFieldError` if a mapping of field values sets a transformers-only field."""
    cls = TrainingArguments if cls is None else cls
    for name, value in values.items():
        if _is_inherited_hf_only(cls, name):
            default = TrainingArguments.__dataclass_fields__[name].default
            if not _is_hf_default(name, value, default):
                raise unsupported_value_error(name, value)


def _is_inherited_hf_only(cls: type, name: str) -> bool:
    # A subclass that declares the field again implements it, so it is not checked.
    if name not in HF_ONLY_FIELDS or not issubclass(cls, TrainingArguments):
        return False
    own = getattr(cls, "__dataclass_fields__", {}).get(name)
    return own is TrainingArguments.__dataclass_fields__[name]


def _check_hf_only(args: TrainingArguments) -> None:
    for name in HF_ONLY_FIELDS:
        if not _is_inherited_hf_only(type(args), name):
            continue
        value = getattr(args, name)
        default = TrainingArguments.__dataclass_fields__[name].default
        if not _is_hf_default(name, value, default):
            raise unsupported_value_error(name, value)
        setattr(args, name, default)


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


def _check_types(args: TrainingArguments) -> None:
    for name, hint in _field_hints().items():
        value = getattr(args, name)
        if not _matches(value, hint) and not (name == "output_dir" and value is None):
            raise ValueError(
                f"`{name}` must be of type {_type_name(hint)}, got {value!r} ({type(value).__name__}); "
                f"pass a {_type_name(hint)} value for `{name}`."
            )


def _normalise(args: TrainingArguments) -> None:
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
    for name in ("fsdp_config", "deepspeed"):
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


def _check_choices(args: TrainingArguments) -> None:
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


def _fill_derived(args: TrainingArguments) -> None:
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


def _at_least(args: TrainingArguments, name: str, low: float, fix: str, optional: bool = False) -> None:
    value = getattr(args, name)
    if optional and value is None:
        return
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value!r}; {fix}.")


def _check_ranges(args: TrainingArguments) -> None:
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


def _check_intervals(args: TrainingArguments) -> None:
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


def _check_best_model(args: TrainingArguments) -> None:
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


def _check_dataloader(args: TrainingArguments) -> None:
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


def _check_log_levels(args: TrainingArguments) -> None:
    _choose("log_level", args.log_level, LOG_LEVEL_NAMES, "a log level")
    _choose("log_level_replica", args.log_level_replica, LOG_LEVEL_NAMES, "a log level")


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _check_hardware(args: TrainingArguments) -> None:
    if args.fp16 and args.bf16:
        raise ValueError("`fp16` and `bf16` are both set; choose one (bf16 where the hardware supports it).")
    if args.fp16 and (args.use_cpu or not _cuda_available()):
        raise ValueError(
            "`fp16` needs a CUDA GPU and none is in use; use bf16=True instead, or run on a GPU."
        )
    if args.tf32 and (args.use_cpu or not _cuda_available()):
        raise ValueError("`tf32` needs an NVIDIA GPU (Ampere or newer) and none is in use; leave tf32 unset.")
