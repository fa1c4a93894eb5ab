from __future__ import annotations

import json
import pickle
import random
import time

import numpy as np
import pytest
import torch

from ember.data import samplers
from ember.data.samplers import (
    ResumableBatchSampler,
    SeededBatch,
    SeededCollator,
    SeededDataset,
    batch_seed,
    fork_rng,
)

torch.set_num_threads(1)


def batches(sampler: ResumableBatchSampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def test_same_seed_same_order_and_seeds_different_seed_differs() -> None:
    a = list(ResumableBatchSampler(100, 8, seed=3))
    b = list(ResumableBatchSampler(100, 8, seed=3))
    c = list(ResumableBatchSampler(100, 8, seed=4))
    assert [list(x) for x in a] == [list(x) for x in b]
    assert [x.seed for x in a] == [x.seed for x in b]
    assert [list(x) for x in a] != [list(x) for x in c]
    assert a[0].seed != c[0].seed
    assert sorted(i for x in a for i in x) == list(range(100))


def test_epochs_differ_and_are_reproducible() -> None:
    s = ResumableBatchSampler(50, 5, seed=0)
    e0 = batches(s)
    s.set_epoch(1)
    e1 = batches(s)
    s.set_epoch(0)
    assert e0 != e1
    assert batches(s) == e0
    assert batches(s) == e0, "the epoch must not advance by itself"


def test_permutation_is_randperm_of_seed_plus_epoch() -> None:
    s = ResumableBatchSampler(20, 20, seed=5)
    s.set_epoch(2)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    assert batches(s) == [expected]


def test_sequential_and_lengths() -> None:
    s = ResumableBatchSampler(10, 4, shuffle=False)
    assert batches(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(s) == 3
    s = ResumableBatchSampler(10, 4, shuffle=False, drop_last=True)
    assert batches(s) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(s) == 2
    assert batches(ResumableBatchSampler(0, 4)) == []


def test_skip_batches_gives_the_tail_until_set_epoch() -> None:
    s = ResumableBatchSampler(103, 10, seed=1)
    s.set_epoch(4)
    full = list(s)
    s.skip_batches(7)
    assert len(s) == 11, "len is the whole epoch, skip or not"
    tail = list(s)
    assert [list(b) for b in tail] == [list(b) for b in full[7:]]
    assert [b.seed for b in tail] == [b.seed for b in full[7:]]
    # The skip holds until set_epoch: a multi-worker DataLoader calls iter() twice when it starts.
    assert [list(b) for b in s] == [list(b) for b in full[7:]]
    s.set_epoch(s.epoch)
    assert len(list(s)) == 11, "set_epoch clears the skip"
    s.skip_batches(11)
    assert list(s) == []


def test_skip_is_read_when_the_iterator_is_created() -> None:
    s = ResumableBatchSampler(30, 10, shuffle=False)
    s.skip_batches(2)
    it = iter(s)
    s.skip_batches(1)  # meant for the next iteration
    assert [list(b) for b in it] == [list(range(20, 30))]
    assert len(list(s)) == 2


def test_skip_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    class CountingBatch(SeededBatch):
        def __init__(self, indices: list[int], seed: int) -> None:
            built.append(1)
            super().__init__(indices, seed)

    monkeypatch.setattr(samplers, "SeededBatch", CountingBatch)
    n = 10_000_000
    s = ResumableBatchSampler(n, 1, seed=0)
    s.skip_batches(n - 5)
    start = time.perf_counter()
    tail = [list(b) for b in s]
    elapsed = time.perf_counter() - start
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert tail == [[i] for i in perm[-5:].tolist()]
    assert len(built) == 5
    assert elapsed < 10.0  # building all 10M batches takes far longer


def test_batch_seed_depends_on_seed_epoch_and_index() -> None:
    seeds = {batch_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= x < 2**63 for x in seeds)
    s = ResumableBatchSampler(40, 4, seed=9)
    s.set_epoch(2)
    assert [b.seed for b in s] == [batch_seed(9, 2, i) for i in range(10)]


def test_distributed_shares_cover_the_dataset() -> None:
    n, bs = 11, 2
    shares = []
    for rank in range(2):
        s = ResumableBatchSampler(n, bs, seed=0, rank=rank, world_size=2)
        got = batches(s)
        assert len(got) == len(s) == 3
        shares.append([i for b in got for i in b])
    assert [len(x) for x in shares] == [6, 6]
    assert set(shares[0]) | set(shares[1]) == set(range(n))
    assert len(set(shares[0]) & set(shares[1])) <= 1  # one wrapped-around pad sample
    seeds = [b.seed for r in range(2) for b in ResumableBatchSampler(n, bs, rank=r, world_size=2)]
    assert len(set(seeds)) == len(seeds)


def test_distributed_drop_last_is_disjoint_and_equal() -> None:
    got = [batches(ResumableBatchSampler(11, 2, drop_last=True, rank=r, world_size=2)) for r in range(2)]
    assert [len(g) for g in got] == [2, 2]
    flat = [set(i for b in g for i in b) for g in got]
    assert not flat[0] & flat[1]
    assert all(len(b) == 2 for g in got for b in g)


def test_more_ranks_than_samples_still_equal_batches() -> None:
    got = [batches(ResumableBatchSampler(3, 2, rank=r, world_size=4)) for r in range(4)]
    assert all(len(g) == 1 and len(g[0]) == 1 for g in got)
    assert {g[0][0] for g in got} == {0, 1, 2}


def test_group_by_length_sorts_megabatches_longest_first() -> None:
    gen = torch.Generator().manual_seed(0)
    n, bs = 1000, 4
    lengths = torch.randint(1, 500, (n,), generator=gen).tolist()
    s = ResumableBatchSampler(n, bs, seed=0, lengths=lengths)
    flat = [i for b in s for i in b]
    assert sorted(flat) == list(range(n))
    assert max(lengths) == lengths[flat[0]], "the longest sample comes first"
    mega = bs * samplers.MEGABATCH_MULT
    for start in range(0, n, mega):
        chunk = [lengths[i] for i in flat[start : start + mega]][1:]
        assert chunk == sorted(chunk, reverse=True)
    assert [list(b) for b in ResumableBatchSampler(n, bs, seed=0, lengths=lengths)] == [
        list(b) for b in ResumableBatchSampler(n, bs, seed=0, lengths=lengths)
    ]
    unsorted = [i for b in ResumableBatchSampler(n, bs, seed=0) for i in b]
    assert flat != unsorted


def test_state_dict_round_trip_is_json_and_resumes() -> None:
    s = ResumableBatchSampler(50, 4, seed=2)
    s.set_epoch(3)
    it = iter(s)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["epoch"] == 3 and state["batches_consumed"] == 5 and state["seed"] == 2
    fresh = ResumableBatchSampler(50, 4, seed=2)
    fresh.load_state_dict(state)
    assert [list(b) for b in fresh] == [list(b) for b in it]


def test_load_state_dict_rejects_a_different_sampler() -> None:
    state = ResumableBatchSampler(50, 4).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        ResumableBatchSampler(50, 8).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"lengths": [1, 2]}, "lengths"),
        ({"num_samples": -1}, "num_samples"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    params = {"num_samples": 10, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=field):
        ResumableBatchSampler(**params)


def test_seeded_batch_pickles_with_its_seed() -> None:
    b = pickle.loads(pickle.dumps(SeededBatch([3, 1, 2], 42)))
    assert b == [3, 1, 2] and b.seed == 42 and isinstance(b, SeededBatch)


class RandomItems:
    """Items drawn from all three global RNGs, like an augmentation pipeline."""

    tag = "rnd"

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[int, float, float, float]:
        return (i, torch.rand(()).item(), random.random(), float(np.random.rand()))


def test_seeded_dataset_draws_from_the_batch_seed_and_keeps_torch_rng() -> None:
    ds = SeededDataset(RandomItems())
    torch_state = torch.get_rng_state()
    a = ds.__getitems__(SeededBatch([0, 1], 7))
    assert torch.equal(torch.get_rng_state(), torch_state)
    # python/numpy are reseeded per batch (not restored): their state is a function of the batch.
    py_state, np_state = random.getstate(), np.random.get_state()
    random.random(), np.random.rand()
    ds.__getitems__(SeededBatch([0, 1], 7))
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert ds.__getitems__(SeededBatch([0, 1], 7)) == a
    assert ds.__getitems__(SeededBatch([0, 1], 8)) != a
    assert a.seed == 7
    assert ds.__getitems__([0, 1])[0][0] == 0  # plain lists fetch without reseeding


def test_seeded_dataset_forwards_and_pickles() -> None:
    ds = SeededDataset(RandomItems())
    assert len(ds) == 6 and ds.tag == "rnd" and ds[2][0] == 2
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.__getitems__(SeededBatch([1], 5)) == ds.__getitems__(SeededBatch([1], 5))
    with pytest.raises(AttributeError):
        _ = ds.missing


def test_seeded_dataset_uses_the_inner_getitems() -> None:
    class Batched:
        def __len__(self) -> int:
            return 4

        def __getitems__(self, idx: list[int]) -> list[str]:
            return [f"b{i}" for i in idx]

    assert SeededDataset(Batched()).__getitems__(SeededBatch([2, 3], 1)) == ["b2", "b3"]


def test_seeded_collator_is_reproducible_and_restores_rngs() -> None:
    collate = SeededCollator(lambda xs: [x + torch.rand(()).item() for x in xs])
    samples = samplers.SeededSamples([1.0, 2.0], 11)
    state = torch.get_rng_state()
    assert collate(samples) == collate(samples)
    assert torch.equal(torch.get_rng_state(), state)
    with fork_rng(11):
        same_stream = [x + torch.rand(()).item() for x in [1.0, 2.0]]
    assert collate(samples) != same_stream, "collation uses its own stream, not the fetch's"
