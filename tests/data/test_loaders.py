from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from ember.args import TrainingArguments
from ember.data.columns import ColumnFilter
from ember.data.loaders import (
    build_eval_dataloader,
    build_train_dataloader,
    dataset_lengths,
    make_train_batch_sampler,
    resolve_data_seed,
)
from ember.data.samplers import ResumableBatchSampler

torch.set_num_threads(1)


def make_args(**overrides: Any) -> TrainingArguments:
    base = {
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 3,
        "seed": 42,
        "data_seed": None,
        "dataloader_drop_last": False,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": True,
        "dataloader_persistent_workers": False,
        "dataloader_prefetch_factor": None,
        "train_sampling_strategy": "random",
        "length_column_name": "length",
    }
    return TrainingArguments(output_dir="unused", **{**base, **overrides})


class Augmented(Dataset):  # type: ignore[type-arg]
    """Random per-item noise from torch, numpy and python, like data augmentation."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict[str, Any]:
        noise = torch.rand(2) + float(np.random.rand()) + random.random()
        return {"x": noise, "idx": i}


def noisy_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    # Randomness at collation (like MLM masking) must be reproducible too.
    x = torch.stack([f["x"] for f in features])
    return {"x": x + torch.rand(x.shape), "idx": torch.tensor([f["idx"] for f in features])}


def as_lists(loader: Any) -> list[tuple[list[list[float]], list[int]]]:
    return [(b["x"].tolist(), b["idx"].tolist()) for b in loader]


def test_random_data_same_with_workers_and_after_skip() -> None:
    reference = as_lists(build_train_dataloader(Augmented(), make_args(), noisy_collate))
    assert len(reference) == 3 and sorted(i for _, idx in reference for i in idx) == list(range(10))
    args = make_args(
        dataloader_num_workers=2, dataloader_persistent_workers=True, dataloader_prefetch_factor=2
    )
    loader = build_train_dataloader(Augmented(), args, noisy_collate)
    assert as_lists(loader) == reference
    loader.batch_sampler.skip_batches(1)
    assert as_lists(loader) == reference[1:]


def test_fetching_leaves_the_torch_rng_alone_and_others_deterministic() -> None:
    loader = build_train_dataloader(Augmented(), make_args(), noisy_collate)
    eval_loader = build_eval_dataloader(Augmented(), make_args(), noisy_collate)
    torch_state = torch.get_rng_state()
    list(loader)
    list(eval_loader)
    assert torch.equal(torch.get_rng_state(), torch_state)
    py_state, np_state = random.getstate(), np.random.get_state()
    random.random(), np.random.rand()
    list(loader)
    list(eval_loader)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_train_loader_follows_args() -> None:
    data = [{"x": float(i), "label": i % 2} for i in range(10)]
    loader = build_train_dataloader(
        data, make_args(train_sampling_strategy="sequential", dataloader_drop_last=True)
    )
    assert isinstance(loader.batch_sampler, ResumableBatchSampler)
    assert len(loader) == 2 and loader.pin_memory is torch.cuda.is_available()
    batches = list(loader)
    assert batches[0]["x"].tolist() == [0.0, 1.0, 2.0, 3.0] and batches[0]["labels"].tolist() == [0, 1, 0, 1]
    sampler = make_train_batch_sampler(data, make_args(), rank=1, world_size=2)
    assert len(build_train_dataloader(data, make_args(), None, sampler)) == 2


def test_data_seed_wins_over_seed() -> None:
    assert resolve_data_seed(make_args(data_seed=7)) == 7 and resolve_data_seed(make_args()) == 42
    data = list(range(50))
    order = [i for b in make_train_batch_sampler(data, make_args(data_seed=7)) for i in b]
    assert order == [i for b in ResumableBatchSampler(50, 4, seed=7) for i in b]
    assert order != [i for b in make_train_batch_sampler(data, make_args(data_seed=8)) for i in b]


def test_eval_loader_is_sequential_and_keeps_the_last_batch() -> None:
    data = [{"x": float(i)} for i in range(7)]
    batches = list(build_eval_dataloader(data, make_args(dataloader_drop_last=True)))
    assert [b["x"].tolist() for b in batches] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0]]


def test_iterable_dataset_uses_plain_batching() -> None:
    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter({"x": float(i)} for i in range(6))

    loader = build_train_dataloader(Stream(), make_args())
    assert loader.batch_sampler is not None and not isinstance(loader.batch_sampler, ResumableBatchSampler)
    assert [b["x"].tolist() for b in loader] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0]]
    assert [len(b["x"]) for b in build_eval_dataloader(Stream(), make_args())] == [3, 3]


def test_group_by_length_lengths_from_column_or_input_ids() -> None:
    with_column = [{"input_ids": [0] * 3, "length": 30} for _ in range(4)]
    assert dataset_lengths(with_column) == [30] * 4
    data = [{"input_ids": [0] * (i % 7 + 1)} for i in range(40)]
    assert dataset_lengths(ColumnFilter(data, frozenset({"input_ids"}))) == [i % 7 + 1 for i in range(40)]
    sampler = make_train_batch_sampler(data, make_args(train_sampling_strategy="group_by_length"))
    first = next(iter(sampler))
    assert max(len(data[i]["input_ids"]) for i in first) == 7
    with pytest.raises(ValueError, match="length_column_name"):
        dataset_lengths([{"x": 1}])


def test_bad_strategy_and_mismatched_sampler_name_the_problem() -> None:
    with pytest.raises(ValueError, match="train_sampling_strategy"):
        make_train_batch_sampler([1, 2], make_args(train_sampling_strategy="batch_rebalance"))
    with pytest.raises(ValueError, match="batch_sampler"):
        build_train_dataloader([1, 2, 3], make_args(), None, ResumableBatchSampler(5, 2))
