"""What `TrainingArguments` holds: its fields with transformers 5.x names and defaults, the enums
and value lists they take. Plain data: nothing here checks a value (see args/validation.py) or
imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..integrations import TRACKER_NAMES
from .names import OPTIMIZER_NAMES, SAMPLING_STRATEGIES, SCHEDULER_NAMES


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
    COSINE_WARMUP_WITH_MIN_LR = "cosine_warmup_with_min_lr"
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
    """transformers' members and values, so `OptimizerNames.ADAMW_BNB` in a script means the same."""

    ADAMW_TORCH = "adamw_torch"
    ADAMW_TORCH_FUSED = "adamw_torch_fused"
    ADAMW_TORCH_XLA = "adamw_torch_xla"
    ADAMW_TORCH_NPU_FUSED = "adamw_torch_npu_fused"
    ADAFACTOR = "adafactor"
    ADAMW_ANYPRECISION = "adamw_anyprecision"
    ADAMW_TORCH_4BIT = "adamw_torch_4bit"
    ADAMW_TORCH_8BIT = "adamw_torch_8bit"
    ADEMAMIX = "ademamix"
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ADAMW_BNB = "adamw_bnb_8bit"
    ADAMW_8BIT = "adamw_8bit"
    ADEMAMIX_8BIT = "ademamix_8bit"
    LION_8BIT = "lion_8bit"
    LION = "lion_32bit"
    PAGED_ADAMW = "paged_adamw_32bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    PAGED_ADEMAMIX = "paged_ademamix_32bit"
    PAGED_ADEMAMIX_8BIT = "paged_ademamix_8bit"
    PAGED_LION = "paged_lion_32bit"
    PAGED_LION_8BIT = "paged_lion_8bit"
    RMSPROP = "rmsprop"
    RMSPROP_BNB = "rmsprop_bnb"
    RMSPROP_8BIT = "rmsprop_bnb_8bit"
    RMSPROP_32BIT = "rmsprop_bnb_32bit"
    GALORE_ADAMW = "galore_adamw"
    GALORE_ADAMW_8BIT = "galore_adamw_8bit"
    GALORE_ADAFACTOR = "galore_adafactor"
    GALORE_ADAMW_LAYERWISE = "galore_adamw_layerwise"
    GALORE_ADAMW_8BIT_LAYERWISE = "galore_adamw_8bit_layerwise"
    GALORE_ADAFACTOR_LAYERWISE = "galore_adafactor_layerwise"
    LOMO = "lomo"
    ADALOMO = "adalomo"
    GROKADAMW = "grokadamw"
    SCHEDULE_FREE_RADAM = "schedule_free_radam"
    SCHEDULE_FREE_ADAMW = "schedule_free_adamw"
    SCHEDULE_FREE_SGD = "schedule_free_sgd"
    APOLLO_ADAMW = "apollo_adamw"
    APOLLO_ADAMW_LAYERWISE = "apollo_adamw_layerwise"
    STABLE_ADAMW = "stable_adamw"


INTERVAL_STRATEGIES: tuple[str, ...] = tuple(m.value for m in IntervalStrategy)
SAVE_STRATEGIES: tuple[str, ...] = tuple(m.value for m in SaveStrategy)
# The parts own these lists (args/names.py); the enums above carry the same values for scripts.
SCHEDULER_TYPES: tuple[str, ...] = SCHEDULER_NAMES
TRAIN_SAMPLING_STRATEGIES: tuple[str, ...] = SAMPLING_STRATEGIES
TOKENS_SEEN_MODES: tuple[str, ...] = ("no", "all", "non_padding")
REPORT_TO_BACKENDS: tuple[str, ...] = TRACKER_NAMES  # the registry in ember.integrations owns the names

# transformers' log level names; "passive" leaves the level as it is.
# fmt: off
LOG_LEVELS: dict[str, int] = {
    "detail": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
    "error": logging.ERROR, "critical": logging.CRITICAL, "passive": -1,
}
# fmt: on
LOG_LEVEL_NAMES: tuple[str, ...] = tuple(LOG_LEVELS)


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainingFields:
    """The fields of `TrainingArguments` (args/training_args.py), which adds validation and the methods."""

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
    # transformers' order of the union: its HfArgumentParser reads it as a str flag.
    optim_target_modules: None | str | list[str] = _f(
        None,
        "Modules whose gradients galore_*/apollo_* optimizers project: a regex (full match), a list of "
        "names (or parts of names), or 'all-linear'. nn.Linear modules only.",
    )
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
    # --- Distributed (launch with torchrun; see ember/strategy) ---
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
    # transformers types it as accelerate's ParallelismConfig; a dict / JSON string keeps argparse working
    # without accelerate, and such an object is read by its attributes (validation.py widens the type).
    parallelism_config: dict[str, Any] | str | None = _f(
        None,
        "Mesh sizes as a dict or JSON (dp_replicate_size, dp_shard_size, tp_size, cp_size, sp_size; "
        "their product is the world size) or an accelerate ParallelismConfig.",
    )
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
    verify_checkpoints: bool = _f(
        True,
        "On resume, re-hash every checkpoint file against its manifest (xxh3_128, well under a second per "
        "GB), so a file changed after writing is found, naming it. False checks sizes only.",
    )
    auto_resume: bool | None = _f(
        None,
        "When train() is given no resume_from_checkpoint: resume from the newest complete checkpoint of "
        "output_dir if there is one, else start fresh. Default (unset): only in a relaunched job "
        "(TORCHELASTIC_RESTART_COUNT or SLURM_RESTART_COUNT > 0, or EMBER_AUTO_RESUME=1); True: "
        "always; False: never (transformers' behaviour).",
        nargs="?",
        const=True,
    )
    peer_stall_timeout: float = _f(
        300.0,
        "Several processes: a rank that has not moved for this many seconds while the others wait for "
        "it at a step (a hang in a callback, dataset or collator) is reported by name on every rank and "
        "the job stops; 0 turns the check off (ddp_timeout still applies). See strategy/peers.py.",
    )
    flops_per_token: float | None = _f(None, "Model FLOPs per token, to report FLOPs utilisation (MFU).")
    device_peak_flops: float | None = _f(None, "Peak FLOP/s of one device, to report MFU.")
    chunked_loss: bool | None = _f(
        None,
        "Causal LMs: compute the training loss from the last hidden states and the output head in chunks "
        "of `loss_chunk_size` tokens, never holding the full logits (same loss and gradients). Default "
        "(unset): on for micro-batches of more than one chunk of labels (not under DeepSpeed), quietly "
        "plain where it cannot apply; True: always, with a notice where it falls back; False: never.",
        nargs="?",
        const=True,
    )
    loss_chunk_size: int = _f(1024, "Tokens per chunk of the chunked loss.")
    nonfinite_step_policy: str = _f(
        "skip",
        "A step whose gradient norm is NaN/inf: 'skip' (no update, counted, warned), 'stop' (raise at "
        "once) or 'ignore' (update anyway, as transformers does).",
    )
    max_consecutive_nonfinite_steps: int = _f(
        3, "With nonfinite_step_policy='skip': this many non-finite steps in a row stop training."
    )
    loss_spike_zscore: float | None = _f(
        None,
        "Roll back a step whose loss is more than this many standard deviations above the mean of the "
        "last loss_spike_window steps (to the state kept every loss_spike_window steps); None: off.",
    )
    loss_spike_window: int = _f(50, "Steps of loss history for loss_spike_zscore, also its warmup.")
    # --- Fine-tuning: the model pipeline (ember/models) ---
    activation_checkpointing: bool | None = _f(
        None, "Recompute activations in backward to save memory (~20-30% slower).", nargs="?", const=True
    )
    activation_checkpointing_kwargs: dict[str, Any] | str | None = _f(
        None, "every_n_layers, offload, and options of torch.utils.checkpoint (use_reentrant: False)."
    )
    gradient_checkpointing: bool | None = _f(
        None, "Alias of activation_checkpointing (transformers' older name).", nargs="?", const=True
    )
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = _f(
        None, "Alias of activation_checkpointing_kwargs."
    )
    torch_compile: bool = _f(False, "torch.compile the model's forward (in place: names unchanged).")
    torch_compile_backend: str | None = _f(
        None, "torch.compile backend (default inductor); sets torch_compile."
    )
    torch_compile_mode: str | None = _f(None, "torch.compile mode, e.g. 'max-autotune'; sets torch_compile.")
    neftune_noise_alpha: float | None = _f(
        None, "NEFTune: noise on input embeddings while training (e.g. 5)."
    )
    auto_find_batch_size: bool = _f(
        False, "On out-of-memory, halve the micro-batch and double accumulation (same global batch)."
    )
    # --- Runtime ---
    skip_memory_metrics: bool = _f(
        True, "Leave out the *_mem_* metrics (CPU RSS, CUDA memory) of train/eval."
    )
    torch_empty_cache_steps: int | None = _f(None, "Empty the device's cache every this many steps.")
    tune_cpu_malloc: bool = _f(
        True,
        "On a CPU under glibc, keep freed tensor memory in the heap between steps (mallopt) instead of "
        "returning it to the kernel and faulting it in again; skipped when MALLOC_*/LD_PRELOAD chose.",
    )
    average_tokens_across_devices: bool = _f(
        True, "Normalise the loss by the tokens of all ranks (ember always does; False only on 1 process)."
    )
    ddp_static_graph: bool | None = _f(None, "DDP static_graph (the graph is the same every step).")
    save_on_each_node: bool = _f(False, "Save on each node's main process (ember: one node only).")
    enable_jit_checkpoint: bool = _f(False, "Checkpoint on SIGTERM and exit; ember always does.")
    # --- transformers fields accepted only at these defaults (HF_ONLY_FIELDS says what to do instead) ---
    bf16_full_eval: bool = _f(False, "Evaluate outside training with the model cast to bf16.")
    fp16_full_eval: bool = _f(False, "Evaluate outside training with the model cast to fp16.")
    use_liger_kernel: bool = _f(
        False,
        "Apply Liger's Triton kernels to the model where liger-kernel and a CUDA GPU are present; elsewhere "
        "ember's chunked loss is used instead (one warning says why).",
    )
    liger_kernel_config: dict[str, bool] | str | None = _f(
        None,
        "Keywords for liger-kernel's apply function, e.g. {'rope': True}; None: its defaults.",
    )
    use_cache: bool = _f(False, "Not supported by ember (set model.config.use_cache); leave False.")
    project: str = _f("huggingface", "Not supported by ember; leave 'huggingface'.")
    trackio_space_id: str | None = _f(None, "Not supported by ember; leave unset.")
    trackio_bucket_id: str | None = _f(None, "Not supported by ember; leave unset.")
    trackio_static_space_id: str | None = _f(None, "Not supported by ember; leave unset.")
    eval_do_concat_batches: bool = _f(True, "Concatenate evaluation batches; False returns a list per batch.")
    eval_use_gather_object: bool = _f(False, "Gather non-tensor evaluation outputs as Python objects.")
    push_to_hub: bool = _f(
        False, "Push the model to the Hub repo `hub_model_id` at saves (see hub_strategy)."
    )
    hub_token: str | None = _f(None, "Hub token with write access; None: the one `hf auth login` saved.")
    hub_private_repo: bool | None = _f(
        None, "Create the repo private (ignored when it exists); None: the owner's default."
    )
    hub_model_id: str | None = _f(
        None, "Repo to push to ('name' under the token's user, or 'org/name'); None: output_dir's name."
    )
    hub_strategy: str = _f(
        "every_save",
        "What is pushed when: 'end' (only push_to_hub()), 'every_save' (the model at each save), "
        "'checkpoint' (also the newest checkpoint as last-checkpoint/), 'all_checkpoints' (each checkpoint "
        "in its own folder).",
    )
    hub_always_push: bool = _f(
        False, "Push at every save even while the previous push is running (False: skip it)."
    )
    hub_revision: str | None = _f(None, "Branch (or revision) of the repo to push to; None: main.")
    accelerator_config: dict[str, Any] | str | None = _f(
        None,
        "transformers' AcceleratorConfig options (dict, JSON or file): split_batches, even_batches, "
        "use_seedable_sampler, non_blocking, gradient_accumulation_kwargs (sync_each_batch).",
    )
    dataloader_multiprocessing_context: str | None = _f(
        None, "Start method of the loader workers ('spawn', 'fork', 'forkserver'); None: torch's default."
    )
    dataloader_in_order: bool = _f(
        True,
        "Workers return batches in order; False: as they finish (order and exact resume then vary).",
    )
    debug: str | list[str] = _f(
        "",
        "'underflow_overflow': stop at the first module whose weights or output hold inf/nan, with the "
        "last frames of per-module abs-min/abs-max.",
    )
