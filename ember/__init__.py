"""ember: the transformers Trainer interface, with exact resume, pickle-free checkpoints and a small loop.

Names are resolved lazily (PEP 562), so `import ember` costs little more than `import torch`
and never imports transformers, datasets or a tracker.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_NAMES = {
    "Trainer": "trainer",
    "TrainingArguments": "args",
    "Seq2SeqTrainer": "trainer.seq2seq",
    "Seq2SeqTrainingArguments": "args.seq2seq",
    "IntervalStrategy": "args",
    "SaveStrategy": "args",
    "SchedulerType": "args",
    "OptimizerNames": "args",
    "TrainerCallback": "callbacks",
    "CallbackHandler": "callbacks",
    "DefaultFlowCallback": "callbacks",
    "ProgressCallback": "callbacks",
    "PrinterCallback": "callbacks",
    "EarlyStoppingCallback": "callbacks",
    "TrainerState": "callbacks.state",
    "TrainerControl": "callbacks.state",
    "EvalPrediction": "outputs",
    "PredictionOutput": "outputs",
    "TrainOutput": "outputs",
    "EvalLoopOutput": "outputs",
    "get_last_checkpoint": "utils",
    "set_seed": "utils",
    "enable_full_determinism": "utils",
    "default_data_collator": "data",
    "BestRun": "search",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))


if TYPE_CHECKING:
    from .args import IntervalStrategy, OptimizerNames, SaveStrategy, SchedulerType, TrainingArguments
    from .args.seq2seq import Seq2SeqTrainingArguments
    from .callbacks import (
        CallbackHandler,
        DefaultFlowCallback,
        EarlyStoppingCallback,
        PrinterCallback,
        ProgressCallback,
        TrainerCallback,
    )
    from .callbacks.state import TrainerControl, TrainerState
    from .data import default_data_collator
    from .outputs import EvalLoopOutput, EvalPrediction, PredictionOutput, TrainOutput
    from .search import BestRun
    from .trainer import Trainer
    from .trainer.seq2seq import Seq2SeqTrainer
    from .utils import enable_full_determinism, get_last_checkpoint, set_seed
