"""`TrainingArguments`: every knob of a training run, with the names and defaults of transformers 5.x.

Only fields that ember implements exist here. A transformers field that ember does not implement is an
error naming it (`UnsupportedFieldError`), never silently ignored; a misspelt name is an error with a
suggestion (`UnknownFieldError`). Every value is checked once, in `validate`, when the object is built.

Split by concern, all importable from here: the fields, enums and value lists in args/fields.py,
transformers-only fields and name errors in args/hf_only.py, validation in args/validation.py (the
distributed fields in args/distributed.py); this module adds the methods scripts call.

This module imports nothing heavy: torch is imported only when a check or property needs the device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from enum import Enum
from typing import TYPE_CHECKING, Any

from .fields import (
    INTERVAL_STRATEGIES,
    LOG_LEVEL_NAMES,
    LOG_LEVELS,
    OPTIMIZER_NAMES,
    REPORT_TO_BACKENDS,
    SAVE_STRATEGIES,
    SCHEDULER_TYPES,
    TOKENS_SEEN_MODES,
    TRAIN_SAMPLING_STRATEGIES,
    IntervalStrategy,
    OptimizerNames,
    ParallelMode,
    SaveStrategy,
    SchedulerType,
    TrainingFields,
)
from .hf_only import (
    HF_ONLY_FIELDS,
    UNSUPPORTED_HF_FIELDS,
    FieldNameError,
    UnknownFieldError,
    UnsupportedFieldError,
    check_field_names,
    check_supported_values,
    unsupported_value_error,
)
from .hub import MASKED_TOKEN
from .validation import _normalise_report_to as _normalise_report_to  # callbacks read report_to with it
from .validation import field_value_types, validate

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

_logger = logging.getLogger("ember.args")

# fmt: off
__all__ = [
    "FieldNameError", "HF_ONLY_FIELDS", "IntervalStrategy", "OptimizerNames", "ParallelMode", "SaveStrategy",
    "SchedulerType", "TrainingArguments", "UNSUPPORTED_HF_FIELDS", "UnknownFieldError",
    "UnsupportedFieldError", "check_eval_dataset", "check_field_names", "check_supported_values",
    "field_value_types", "validate", "unsupported_value_error",
    # The value lists, as they always were importable from here.
    "INTERVAL_STRATEGIES", "LOG_LEVEL_NAMES", "LOG_LEVELS", "OPTIMIZER_NAMES", "REPORT_TO_BACKENDS",
    "SAVE_STRATEGIES", "SCHEDULER_TYPES", "TOKENS_SEEN_MODES", "TRAIN_SAMPLING_STRATEGIES",
]
# fmt: on


@dataclass
class TrainingArguments(TrainingFields):
    """Arguments of a training run. Field names and defaults follow transformers 5.x (the fields
    are declared in args/fields.py; validation is in args/validation.py)."""

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
        return (self.local_process_index if self.save_on_each_node else self.process_index) == 0

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
                if isinstance(value, Enum):
                    value = value.value
                elif hasattr(value, "to_dict"):  # the AcceleratorConfig, as transformers writes it
                    value = value.to_dict()
                out[f.name] = copy.deepcopy(value)
        if out.get("hub_token") is not None:
            # As transformers: saved arguments (checkpoints' training_args.json, pushed to the Hub
            # with them) never hold the token.
            out["hub_token"] = MASKED_TOKEN
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
        """Turn on pushing to the Hub repo `model_id` (sets push_to_hub and the hub_* fields)."""
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
