"""DataLoader construction from TrainingArguments."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..args.accelerator_config import accelerator_config_of, rank_batch_size
from ..args.names import SAMPLING_STRATEGIES
from .collators import default_data_collator
from .samplers import ResumableBatchSampler, SeededCollator, SeededDataset, fork_rng

if TYPE_CHECKING:
    from ..args.training_args import TrainingArguments

__all__ = [
    "SAMPLING_STRATEGIES",
    "build_eval_dataloader",
    "build_train_dataloader",
    "dataset_lengths",
    "make_train_batch_sampler",
    "resolve_data_seed",
    "seed_worker",
]


Collator = Callable[[Any], Any]


def resolve_data_seed(args: TrainingArguments) -> int:
    return int(args.data_seed if args.data_seed is not None else args.seed)


def seed_worker(worker_id: int) -> None:
    """Worker init: one intra-op thread per worker, so N workers do not oversubscribe the CPU.

    Torch already seeds each worker's torch/random/numpy from the loader's generator, and
    `SeededDataset` reseeds per batch, so nothing else needs seeding here.
    """
    torch.set_num_threads(1)


def is_iterable_dataset(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset) or not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    )


class _IterableAdapter(IterableDataset):  # type: ignore[type-arg]
    """Lets the DataLoader stream a plain iterable (a generator-backed object, ...)."""

    def __init__(self, iterable: Any) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)


def _worker_kwargs(args: TrainingArguments) -> dict[str, Any]:
    workers = int(args.dataloader_num_workers)
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        # Pinning only helps host-to-GPU copies, and warns when no GPU exists.
        "pin_memory": bool(args.dataloader_pin_memory) and torch.cuda.is_available(),
    }
    if workers > 0:
        kwargs["persistent_workers"] = bool(args.dataloader_persistent_workers)
        kwargs["worker_init_fn"] = seed_worker
        if args.dataloader_prefetch_factor is not None:
            kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
        if args.dataloader_multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = args.dataloader_multiprocessing_context
        if not args.dataloader_in_order:
            # Workers hand batches over as they finish; the run's order (and so an exact resume)
            # then depends on timing, which the user chose.
            kwargs["in_order"] = False
    return kwargs


def _stream_loader(
    dataset: Any, args: TrainingArguments, collator: Collator, batch_size: int, drop_last: bool, seed: int
) -> DataLoader:
    if not isinstance(dataset, IterableDataset):
        dataset = _IterableAdapter(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collator,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **_worker_kwargs(args),
    )


def build_train_dataloader(
    dataset: Any,
    args: TrainingArguments,
    collator: Collator | None = None,
    batch_sampler: ResumableBatchSampler | None = None,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Training DataLoader: `SeededDataset` + a `ResumableBatchSampler` (built from `args`
    when not given) for map-style data, plain batching for an iterable dataset.

    The loader owns a generator seeded from `seed` (data seed by default), so creating its
    iterator (torch draws the workers' base seed then) never touches the global torch RNG.
    """
    collator = collator if collator is not None else default_data_collator
    seed = resolve_data_seed(args) if seed is None else seed
    batch_size = rank_batch_size(args.per_device_train_batch_size, args, world_size)
    if is_iterable_dataset(dataset):
        if world_size > 1:
            from .sharding import ShardedIterable

            even = accelerator_config_of(args).even_batches
            if not even and not args.dataloader_drop_last:
                raise ValueError(
                    "`accelerator_config['even_batches']`=False with an iterable train dataset on "
                    f"{world_size} ranks: the stream's last round would give the ranks different numbers "
                    "of batches, and a rank that trains one more waits forever for the others in the "
                    "gradient all-reduce. Set dataloader_drop_last=True (the last incomplete round is "
                    "dropped) or leave even_batches=True (it is completed from the stream's start)."
                )
            dataset = ShardedIterable(dataset, batch_size, rank, world_size, args.dataloader_drop_last, even)
        # Each rank's workers get their own random streams (rank 0 keeps the single-process ones).
        return _stream_loader(dataset, args, collator, batch_size, args.dataloader_drop_last, seed + rank)
    if batch_sampler is None:
        batch_sampler = make_train_batch_sampler(dataset, args, seed=seed)
    if batch_sampler.num_samples != len(dataset):
        raise ValueError(
            f"the batch_sampler covers {batch_sampler.num_samples} samples but the train dataset has "
            f"{len(dataset)}; build it for this dataset"
        )
    check_uneven_training(batch_sampler, args)
    return DataLoader(
        SeededDataset(dataset, defer=True),
        batch_sampler=batch_sampler,
        collate_fn=SeededCollator(collator),
        generator=torch.Generator().manual_seed(seed),
        **_worker_kwargs(args),
    )


def check_uneven_training(sampler: Any, args: TrainingArguments) -> None:
    """With even_batches=False the ranks' shares differ by up to one sample, so their last batch may be
    missing on some ranks. That trains only if every rank still takes the same number of optimizer
    steps (each step reduces gradients once, after its last micro-batch) and, with sync_each_batch,
    the same number of micro-batches; otherwise one rank would wait forever in a collective."""
    if getattr(sampler, "even_batches", True) or sampler.drop_last or sampler.world_size <= 1:
        return
    n, world, bs = sampler.num_samples, sampler.world_size, sampler.batch_size
    most, fewest = (math.ceil(len(range(r, n, world)) / bs) for r in (0, world - 1))
    ga = args.gradient_accumulation_steps
    sync_each = accelerator_config_of(args).sync_each_batch
    if math.ceil(most / ga) != math.ceil(fewest / ga) or (sync_each and most != fewest):
        raise ValueError(
            f"`accelerator_config['even_batches']`=False: the {n} training samples give rank 0 {most} "
            f"batches of up to {bs} and rank {world - 1} {fewest}, so the ranks would take different numbers "
            "of gradient reductions and one would wait forever for the others. Leave even_batches=True "
            "(the short ranks are completed from the start of the data), set dataloader_drop_last=True, "
            "or choose a batch size or dataset size that shares out evenly."
        )


def build_eval_dataloader(
    dataset: Any,
    args: TrainingArguments,
    collator: Collator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Evaluation DataLoader: in dataset order, last incomplete batch kept.

    Map-style data is fetched under fixed per-batch seeds too, so evaluating does not move
    the training RNG streams and random `__getitem__` code gives the same eval set each time.
    With several ranks, the same batches are dealt out round-robin (`DistributedEvalSampler`).
    """
    collator = collator if collator is not None else default_data_collator
    seed = resolve_data_seed(args)
    batch_size = rank_batch_size(args.per_device_eval_batch_size, args, world_size)
    even = accelerator_config_of(args).even_batches
    if is_iterable_dataset(dataset):
        if world_size > 1:
            from .sharding import ShardedIterable

            dataset = ShardedIterable(dataset, batch_size, rank, world_size, drop_last=False, even=even)
        return _stream_loader(dataset, args, collator, batch_size, False, seed)
    sampler: Any
    if world_size > 1:
        from .sharding import DistributedEvalSampler

        sampler = DistributedEvalSampler(len(dataset), batch_size, rank, world_size, seed=seed, even=even)
    else:
        sampler = ResumableBatchSampler(len(dataset), batch_size, drop_last=False, shuffle=False, seed=seed)
    return DataLoader(
        SeededDataset(dataset, defer=True),
        batch_sampler=sampler,
        collate_fn=SeededCollator(collator),
        generator=torch.Generator().manual_seed(seed),
        **_worker_kwargs(args),
    )


def _unwrap_dataset(dataset: Any) -> Any:
    # Length columns are usually not forward arguments, so pruning wrappers may hide them.
    from .columns import ColumnFilter

    while isinstance(dataset, (ColumnFilter, SeededDataset)):
        dataset = dataset.dataset
    return dataset


def dataset_lengths(
    dataset: Any, length_column_name: str = "length", model_input_name: str = "input_ids"
) -> list[int]:
    """One length per sample: the `length_column_name` column if present, else the length of
    each sample's `model_input_name` (one pass over the data)."""
    dataset = _unwrap_dataset(dataset)
    names = getattr(dataset, "column_names", None)
    if isinstance(names, (list, tuple)):
        if length_column_name in names:
            return [int(n) for n in dataset[length_column_name]]
        if model_input_name in names:
            return [len(x) for x in dataset[model_input_name]]
    lengths = []
    # The pass may run user `__getitem__` code that draws random numbers.
    with fork_rng(0):
        for i in range(len(dataset)):
            item = dataset[i]
            if isinstance(item, Mapping) and length_column_name in item:
                lengths.append(int(item[length_column_name]))
            elif isinstance(item, Mapping) and model_input_name in item:
                lengths.append(len(item[model_input_name]))
            else:
                raise ValueError(
                    "train_sampling_strategy='group_by_length' needs sample lengths: items must be dicts "
                    f"with a `{length_column_name}` (length_column_name) or `{model_input_name}` entry"
                )
    return lengths


def make_train_batch_sampler(
    dataset: Sequence[Any],
    args: TrainingArguments,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
    model_input_name: str = "input_ids",
) -> ResumableBatchSampler:
    """The training batch sampler `args` describe (batch size, drop_last, sampling strategy).

    Pass the dataset before column pruning when grouping by length: the length column is
    rarely a forward argument.
    """
    strategy = args.train_sampling_strategy
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(
            f"train_sampling_strategy={strategy!r} is not supported by ember; "
            f"use one of {', '.join(SAMPLING_STRATEGIES)}"
        )
    lengths = None
    if strategy == "group_by_length":
        lengths = dataset_lengths(dataset, args.length_column_name, model_input_name)
    config = accelerator_config_of(args)
    return ResumableBatchSampler(
        len(dataset),
        rank_batch_size(args.per_device_train_batch_size, args, world_size),
        drop_last=args.dataloader_drop_last,
        shuffle=strategy != "sequential",
        seed=resolve_data_seed(args) if seed is None else seed,
        lengths=lengths,
        rank=rank,
        world_size=world_size,
        even_batches=config.even_batches,
        seedable=config.use_seedable_sampler,
    )


_END = object()


class SkipFirstBatches:
    """A loader's batches after its first `num_batches`, read and dropped: the resume of data that
    cannot jump (an iterable dataset). It forwards `len`, `dataset` and `set_epoch` to the loader."""

    def __init__(self, loader: Any, num_batches: int) -> None:
        self.loader, self.num_batches = loader, num_batches
        self.dataset = getattr(loader, "dataset", None)

    def __iter__(self) -> Any:
        batches = iter(self.loader)
        for _ in range(self.num_batches):
            if next(batches, _END) is _END:
                return
        yield from batches

    def __len__(self) -> int:
        return max(len(self.loader) - self.num_batches, 0)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
