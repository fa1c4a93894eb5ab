"""Resumable, seeded batch sampling.

The data position is plain state: (seed, epoch, batches consumed). Resuming slices the
epoch's permutation instead of replaying batches, so it costs the same at step 10 or 10M.
Every batch carries a seed derived from (seed, epoch, global batch index); `SeededDataset`
reseeds the RNGs from it around the fetch, so random `__getitem__` code (augmentation) gives
the same samples whatever the number of workers and after a resume.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = [
    "MEGABATCH_MULT",
    "ResumableBatchSampler",
    "SeededBatch",
    "SeededCollator",
    "SeededDataset",
    "SeededSamples",
    "batch_seed",
    "batch_rng",
    "fork_rng",
]

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
# Collation gets its own stream, so adding randomness to a collator does not shift the samples.
_COLLATE_SALT = 0x5EED_C011_A7E0_0001
MEGABATCH_MULT = 50


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _epoch_key(seed: int, epoch: int) -> int:
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64))


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of global batch `index` of `epoch`; 63 bits so every RNG accepts it."""
    return _splitmix64(_epoch_key(seed, epoch) ^ (index & _MASK64)) >> 1


@contextmanager
def fork_rng(seed: int) -> Iterator[None]:
    """Seed python `random`, numpy's global RNG and torch's CPU RNG; restore all three on exit."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed((seed & _MASK32, (seed >> 32) & _MASK32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)


@contextmanager
def batch_rng(seed: int) -> Iterator[None]:
    """The per-batch form of `fork_rng`, cheap enough for every micro-batch (~25 us against ~340).

    torch's CPU generator (dropout, initialisation) is forked and restored: the model's random
    stream never depends on data loading. Python's `random` and numpy's global RNG are only
    reseeded: saving and restoring numpy's 2.5 KB state was most of the data path's per-batch
    cost. So in the process that fetches (the main one when dataloader_num_workers=0) those two
    streams restart from each batch's seed: still a pure function of (seed, epoch, batch), hence
    identical after a resume, but not one long stream.
    """
    torch_state = torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed & _MASK32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)


class SeededBatch(list):  # type: ignore[type-arg]
    """A batch of dataset indices (`list[int]`) with the seed its samples are drawn under."""

    __slots__ = ("seed",)

    def __init__(self, indices: Sequence[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self), self.seed))

    def __repr__(self) -> str:
        return f"SeededBatch({list.__repr__(self)}, seed={self.seed})"


class SeededSamples(list):  # type: ignore[type-arg]
    """Fetched samples of a `SeededBatch`; carries the seed on to `SeededCollator`."""

    __slots__ = ("seed",)

    def __init__(self, samples: Sequence[Any], seed: int) -> None:
        super().__init__(samples)
        self.seed = seed

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self), self.seed))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _group_by_length(perm: torch.Tensor, lengths: torch.Tensor, megabatch: int) -> torch.Tensor:
    """Sort each megabatch of `perm` by length, longest first, and move the longest sample
    overall to the very first batch so an out-of-memory shows up on the first step."""
    chunks = []
    for start in range(0, perm.numel(), megabatch):
        chunk = perm[start : start + megabatch]
        order = torch.sort(lengths[chunk], descending=True, stable=True).indices
        chunks.append(chunk[order])
    if len(chunks) > 1:
        firsts = torch.stack([c[0] for c in chunks])
        best = int(torch.argmax(lengths[firsts]))
        longest = chunks[best][0].clone()
        chunks[best][0] = chunks[0][0]
        chunks[0][0] = longest
    return torch.cat(chunks) if chunks else perm


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices for one rank, resumable in O(1).

    Each epoch's order is `torch.randperm(num_samples)` under `Generator().manual_seed(seed +
    epoch)` (or `arange` when `shuffle=False`), optionally grouped by length; with `seedable=False`
    (accelerate's use_seedable_sampler=False) the generator's seed is drawn from the global torch RNG
    when the epoch starts, and kept in `state_dict()`. Rank `r` of `world_size` takes every
    `world_size`-th index from `r`, the order being padded by wrapping around so every rank gets the
    same number of batches (with `drop_last` the tail is cut instead, and incomplete batches are
    dropped; with `even_batches=False` nothing is added, and a rank's share may be one sample shorter).

    The epoch does not advance by itself: call `set_epoch(e)` before each epoch. The trainer,
    not the sampler, knows how many batches were trained (a DataLoader prefetches ahead), so to
    resume it calls `set_epoch(e)` and `skip_batches(n)`; `state_dict()["batches_consumed"]` is
    the sampler's own cursor and a trainer should overwrite it with its count before saving.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        even_batches: bool = True,
        seedable: bool = True,
    ) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 0)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"`rank` must be < world_size ({world_size}), got {rank}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.lengths: torch.Tensor | None = None
        if lengths is not None:
            if len(lengths) != num_samples:
                raise ValueError(
                    f"`lengths` has {len(lengths)} entries but the dataset has {num_samples} samples; "
                    "pass one length per sample"
                )
            self.lengths = torch.as_tensor(lengths, dtype=torch.int64)
        self.even_batches = bool(even_batches)
        self.seedable = bool(seedable)
        if self.drop_last:
            self.samples_per_rank = num_samples // world_size
            self._num_batches = self.samples_per_rank // batch_size
        elif self.even_batches:
            self.samples_per_rank = math.ceil(num_samples / world_size)
            self._num_batches = math.ceil(self.samples_per_rank / batch_size)
        else:
            # accelerate's even_batches=False: no sample twice; this rank's share may be one shorter.
            self.samples_per_rank = len(range(rank, num_samples, world_size))
            self._num_batches = math.ceil(self.samples_per_rank / batch_size)
        self.epoch = 0
        # use_seedable_sampler=False: (epoch, seed drawn from the global torch RNG at that epoch's start).
        self._drawn: tuple[int, int] | None = None
        self._skip = 0
        self._cursor = 0
        self._cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)
        self._cursor = 0
        self._skip = 0
        if not self.seedable and self.shuffle:
            self._draw(self.epoch)

    def _draw(self, epoch: int) -> int:
        # As torch's RandomSampler without a generator: one int64 from the global torch RNG seeds the
        # epoch's shuffle. It is kept (and checkpointed), so a resumed epoch is not drawn again.
        if self._drawn is None or self._drawn[0] != epoch:
            self._drawn = (epoch, int(torch.empty((), dtype=torch.int64).random_().item()))
            self._cache = None
        return self._drawn[1]

    def restore_drawn_order(self, state: dict[str, Any]) -> None:
        """Take the shuffle seed a saved run drew for its epoch (use_seedable_sampler=False), so the
        resumed epoch continues the same order; the next epochs draw from the restored global RNG."""
        if not self.seedable and "drawn_seed" in state:
            self._drawn, self._cache = (int(state["drawn_epoch"]), int(state["drawn_seed"])), None

    def _epoch_generator(self, epoch: int) -> torch.Generator:
        """The generator of `epoch`'s shuffle: ember's (seed + epoch), or one drawn from the global RNG."""
        return torch.Generator().manual_seed(self.seed + epoch if self.seedable else self._draw(epoch))

    def skip_batches(self, n: int) -> None:
        """Start iterations of the current epoch after `n` batches (until the next `set_epoch`)."""
        self._skip = _check_int("skip_batches(n)", n, 0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """Every sample index in `epoch`'s order, before the ranks take their share; a pure function
        of (seed, epoch), which is what makes resuming exact (subclasses order differently)."""
        n = self.num_samples
        if not self.shuffle:
            return torch.arange(n)
        perm = torch.randperm(n, generator=self._epoch_generator(epoch))
        if self.lengths is not None:
            perm = _group_by_length(perm, self.lengths, self.batch_size * MEGABATCH_MULT)
        return perm

    def _rank_indices(self, epoch: int) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.num_samples
        perm = self._epoch_order(epoch)
        if not self.even_batches and not self.drop_last:
            local = perm[self.rank : n : self.world_size]
            self._cache = (epoch, local)
            return local
        total = self.samples_per_rank * self.world_size
        if total > n:
            perm = torch.cat([perm] * math.ceil(total / n))
        local = perm[self.rank : total : self.world_size]
        self._cache = (epoch, local)
        return local

    def __iter__(self) -> Iterator[SeededBatch]:
        # The skip holds until the next set_epoch(): a multi-worker DataLoader calls iter() on its
        # batch sampler twice when it starts (once in __init__, once in _reset), so clearing the
        # skip at the first call would lose it.
        start = self._skip
        self._cursor = min(start, self._num_batches)
        return self._batches(self.epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[SeededBatch]:
        local = self._rank_indices(epoch) if start < self._num_batches else None
        key, bs, ws = _epoch_key(self.seed, epoch), self.batch_size, self.world_size
        for j in range(start, self._num_batches):
            assert local is not None
            indices = local[j * bs : (j + 1) * bs].tolist()
            self._cursor = j + 1
            yield SeededBatch(indices, _splitmix64(key ^ (j * ws + self.rank)) >> 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_consumed": self._cursor,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "group_by_length": self.lengths is not None,
            "even_batches": self.even_batches,
            "seedable": self.seedable,
            **({"drawn_epoch": self._drawn[0], "drawn_seed": self._drawn[1]} if self._drawn else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`'s position; the next `__iter__` starts after its consumed batches."""
        current = self.state_dict()
        keys: tuple[str, ...] = ("seed", "num_samples", "batch_size", "world_size", "shuffle", "drop_last")
        keys += ("group_by_length", "even_batches", "seedable")
        wrong = [
            f"{k} (saved {state[k]!r}, now {current[k]!r})"
            for k in keys
            if k in state and state[k] != current[k]
        ]
        if wrong:
            raise ValueError(
                "cannot resume the data position: the sampler differs from the saved one in "
                + ", ".join(wrong)
                + "; use the same settings, or set ignore_data_skip=True to restart the data order"
            )
        self.restore_drawn_order(state)
        self.set_epoch(int(state["epoch"]))
        self.skip_batches(int(state.get("batches_consumed", 0)))


class _DeferredFetch:
    """A batch whose fetch `SeededCollator` runs, so fetch and collation share one RNG fork
    (saving and restoring numpy's global state is the costly part, ~0.1 ms)."""

    __slots__ = ("dataset", "indices", "seed")

    def __init__(self, dataset: SeededDataset, indices: list[int], seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, indices, seed


class SeededDataset(Dataset):  # type: ignore[type-arg]
    """Wraps a map-style dataset so each batch is fetched under its `SeededBatch.seed`.

    The RNGs are restored after the fetch, so with `num_workers=0` the main process's stream
    (dropout, ...) is the same whether or not `__getitem__` draws random numbers. With
    `defer=True` the fetch is left to a `SeededCollator`, which must then be the collate_fn.
    """

    def __init__(self, dataset: Any, defer: bool = False) -> None:
        self.dataset = dataset
        self.defer = defer

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def fetch(self, indices: list[int]) -> list[Any]:
        inner = getattr(self.dataset, "__getitems__", None)
        if inner is not None:
            return list(inner(indices))
        return [self.dataset[i] for i in indices]

    def __getitems__(self, indices: list[int]) -> Any:
        seed = getattr(indices, "seed", None)
        if seed is None:
            return self.fetch(indices)
        if self.defer:
            return _DeferredFetch(self, indices, seed)
        with batch_rng(seed):
            samples = self.fetch(indices)
        return SeededSamples(samples, seed)

    def __getattr__(self, name: str) -> Any:
        # Guard: during unpickling `dataset` is not set yet and lookups must not recurse.
        if name in ("dataset", "defer"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededCollator:
    """Runs a collate function under the batch's seed, so random collation (e.g. masking) is
    as reproducible as the samples. Fetches a deferred batch in the same RNG fork."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: Any) -> Any:
        if isinstance(samples, _DeferredFetch):
            with batch_rng(samples.seed):
                fetched = SeededSamples(samples.dataset.fetch(samples.indices), samples.seed)
                return self.collate_fn(fetched)
        seed = getattr(samples, "seed", None)
        if seed is None:
            return self.collate_fn(samples)
        with batch_rng(_splitmix64(seed ^ _COLLATE_SALT) >> 1):
            return self.collate_fn(samples)

    def __getattr__(self, name: str) -> Any:
        if name == "collate_fn":
            raise AttributeError(name)
        return getattr(self.collate_fn, name)
