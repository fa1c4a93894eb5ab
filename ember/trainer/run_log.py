"""The INFO block transformers logs as training starts, so `log_level="info"` users see the same
numbers: examples, epochs, batch sizes, accumulation, optimization steps, trainable parameters."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("ember")


def log_training_start(trainer: Any, plan: Any, loader: Any) -> None:
    args = trainer.args
    if not logger.isEnabledFor(logging.INFO):
        return  # counting examples can walk a loader; skip it when nobody reads the block
    try:
        examples: int | str = trainer.num_examples(loader)
    except TypeError:
        examples = "unknown (an iterable dataset)"
    lines = [
        "***** Running training *****",
        f"  Num examples = {examples:,}" if isinstance(examples, int) else f"  Num examples = {examples}",
        f"  Num Epochs = {plan.num_epochs:,}",
        f"  Instantaneous batch size per device = {args.per_device_train_batch_size:,}",
        "  Total train batch size (w. parallel, distributed & accumulation) = "
        f"{trainer.get_total_train_batch_size(args):,}",
        f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}",
        f"  Total optimization steps = {plan.max_steps:,}",
        f"  Number of trainable parameters = {trainer.get_num_trainable_parameters():,}",
    ]
    logger.info("\n".join(lines))
