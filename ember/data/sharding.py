"""Data for several ranks: sequential evaluation batches dealt out to ranks, and iterable datasets
split so that every rank sees the same number of batches (a rank with fewer would leave the
others waiting in a collective).

Evaluation: global batch g (the same batches, in the same order, as one process would make) goes
to rank g % world_size. Gathering step j then concatenates batches j*W, j*W+1, ... in dataset
order. Ranks left without a batch at the end get a copy of the last real batch; those copies come
after every real sample in gathered order, so cutting the gathered rows at the dataset size
removes them, and their losses are never counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, Sampler

from .samplers import SeededBatch, batch_seed


class DistributedEvalSampler(Sampler[list[int]]):
    """Batches of `batch_size` consecutive indices; rank `rank` takes every `world_size`-th batch.

    `padding_from` is the local batch index from which this rank's batches are padding;
    `num_samples` is the real dataset size (what gathered rows are cut back to).
    """

    def __init__(
        self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int = 0, even: bool = True
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, {world_size}), got {rank}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_batches_total = math.ceil(self.num_samples / self.batch_size)
        # Local batches j with j * W + rank < total are real.
        self.padding_from = max(0, math.ceil((self.num_batches_total - rank) / world_size))
        # even_batches=False: only the real batches, so ranks may have one fewer (the loop joins the
        # gathers it has no batch for); otherwise every rank has as many as rank 0.
        self.even = even
        self._per_rank = math.ceil(self.num_batches_total / world_size) if even else self.padding_from

    def __len__(self) -> int:
        return self._per_rank

    def _global_batch(self, g: int) -> SeededBatch:
        start = g * self.batch_size
        indices = list(range(start, min(start + self.batch_size, self.num_samples)))
        # The batch seed of global batch g is the one a single process uses for its batch g.
        return SeededBatch(indices, batch_seed(self.seed, 0, g))

    def __iter__(self) -> Iterator[SeededBatch]:
        for j in range(self._per_rank):
            g = j * self.world_size + self.rank
            yield self._global_batch(g if g < self.num_batches_total else self.num_batches_total - 1)

    def set_epoch(self, epoch: int) -> None:
        pass


class ShardedIterable(IterableDataset):  # type: ignore[type-arg]
    """Rank r of W takes items [r*b, (r+1)*b) of every W*b items of the stream.

    The stream's last, incomplete round is completed with items from its start (or dropped with
    `drop_last`), so every rank yields the same number of full batches; with `even=False`
    (even_batches=False) it is shared out as it is, so the last batches are short or absent.
    """

    def __init__(
        self, dataset: Any, batch_size: int, rank: int, world_size: int, drop_last: bool, even: bool = True
    ) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.even = even

    def __iter__(self) -> Iterator[Any]:
        size, b = self.batch_size * self.world_size, self.batch_size
        mine = slice(self.rank * b, (self.rank + 1) * b)
        head: list[Any] = []
        buffer: list[Any] = []
        for item in self.dataset:
            if len(head) < size:
                head.append(item)
            buffer.append(item)
            if len(buffer) == size:
                yield from buffer[mine]
                buffer = []
        if buffer and not self.drop_last:
            if not self.even:  # even_batches=False: the last round as it is, short or empty here
                yield from buffer[mine]
                return
            while len(buffer) < size:
                buffer.extend(head[: size - len(buffer)])
            yield from buffer[mine]

    def __getattr__(self, name: str) -> Any:
        # set_epoch and other dataset hooks reach the wrapped dataset.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
