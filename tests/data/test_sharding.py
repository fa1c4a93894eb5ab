"""Evaluation batches dealt to ranks, and iterable datasets split so every rank gets as many batches."""

from __future__ import annotations

import pytest

from ember.data.samplers import ResumableBatchSampler
from ember.data.sharding import DistributedEvalSampler, ShardedIterable
from ember.strategy.multi import _pad_to_shape


@pytest.mark.parametrize(("n", "batch", "world"), [(13, 2, 2), (10, 4, 3), (3, 4, 2), (8, 2, 2), (0, 2, 2)])
def test_eval_batches_in_gathered_order_are_the_single_process_batches(n, batch, world):
    single = list(ResumableBatchSampler(n, batch, shuffle=False, seed=5))
    samplers = [DistributedEvalSampler(n, batch, r, world, seed=5) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of batches
    gathered = [b for step in zip(*per_rank) for b in step]
    real = [
        b for j, step in enumerate(zip(*per_rank)) for r, b in enumerate(step) if j < samplers[r].padding_from
    ]
    assert [list(b) for b in real] == [list(b) for b in single]
    assert [b.seed for b in real] == [b.seed for b in single]
    # Padding batches come after every real sample: cutting the gathered rows at n removes them.
    assert [i for b in gathered for i in b][:n] == list(range(n))


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterable_shards_have_equal_batch_counts_and_cover_the_stream(drop_last):
    stream = list(range(11))
    shards = [list(ShardedIterable(stream, 2, r, 2, drop_last)) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert shards[0][:4] == [0, 1, 4, 5] and shards[1][:4] == [2, 3, 6, 7]
    if drop_last:
        assert sorted(shards[0] + shards[1]) == list(range(8))
    else:
        assert set(shards[0] + shards[1]) == set(stream)
        assert len(shards[0]) == 6  # the last round is completed from the start of the stream


def test_padding_for_gathering_uses_minus_100():
    import torch

    out = _pad_to_shape(torch.ones(2, 3, dtype=torch.long), [2, 5])
    assert out.tolist() == [[1, 1, 1, -100, -100]] * 2
