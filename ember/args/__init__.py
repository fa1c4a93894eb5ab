"""The arguments of a run: `TrainingArguments` and everything scripts import beside it.

`training_args.py` is the dataclass and its methods; `fields.py` the fields, enums and value
lists; `validation.py` the checks run at construction (`distributed.py` those of the distributed
fields); `hf_only.py` the transformers fields ember does not implement; `names.py` the name lists
the parts own; `parser.py` reads YAML/JSON files and command-line flags into arguments.
"""

from __future__ import annotations

from .training_args import (
    HF_ONLY_FIELDS,
    INTERVAL_STRATEGIES,
    LOG_LEVEL_NAMES,
    LOG_LEVELS,
    OPTIMIZER_NAMES,
    REPORT_TO_BACKENDS,
    SAVE_STRATEGIES,
    SCHEDULER_TYPES,
    TOKENS_SEEN_MODES,
    TRAIN_SAMPLING_STRATEGIES,
    UNSUPPORTED_HF_FIELDS,
    FieldNameError,
    IntervalStrategy,
    OptimizerNames,
    ParallelMode,
    SaveStrategy,
    SchedulerType,
    TrainingArguments,
    UnknownFieldError,
    UnsupportedFieldError,
    check_eval_dataset,
    check_field_names,
    check_supported_values,
    field_value_types,
    unsupported_value_error,
    validate,
)

__all__ = [
    "HF_ONLY_FIELDS",
    "INTERVAL_STRATEGIES",
    "LOG_LEVELS",
    "LOG_LEVEL_NAMES",
    "OPTIMIZER_NAMES",
    "REPORT_TO_BACKENDS",
    "SAVE_STRATEGIES",
    "SCHEDULER_TYPES",
    "TOKENS_SEEN_MODES",
    "TRAIN_SAMPLING_STRATEGIES",
    "UNSUPPORTED_HF_FIELDS",
    "FieldNameError",
    "IntervalStrategy",
    "OptimizerNames",
    "ParallelMode",
    "SaveStrategy",
    "SchedulerType",
    "TrainingArguments",
    "UnknownFieldError",
    "UnsupportedFieldError",
    "check_eval_dataset",
    "check_field_names",
    "check_supported_values",
    "field_value_types",
    "unsupported_value_error",
    "validate",
]
