"""Data pipeline: resumable seeded samplers, collators, column pruning, DataLoader builders."""

from __future__ import annotations

from .collators import PaddingCollator, default_data_collator, pick_collator
from .columns import remove_unused_columns, signature_columns, unwrap_model
from .loaders import (
    build_eval_dataloader,
    build_train_dataloader,
    dataset_lengths,
    make_train_batch_sampler,
    resolve_data_seed,
    seed_worker,
)
from .packing import PackingCollator
from .samplers import (
    ResumableBatchSampler,
    SeededBatch,
    SeededCollator,
    SeededDataset,
    batch_seed,
    fork_rng,
)

__all__ = [
    "PackingCollator",
    "PaddingCollator",
    "ResumableBatchSampler",
    "SeededBatch",
    "SeededCollator",
    "SeededDataset",
    "batch_seed",
    "build_eval_dataloader",
    "build_train_dataloader",
    "dataset_lengths",
    "default_data_collator",
    "fork_rng",
    "make_train_batch_sampler",
    "pick_collator",
    "remove_unused_columns",
    "resolve_data_seed",
    "seed_worker",
    "signature_columns",
    "unwrap_model",
]
