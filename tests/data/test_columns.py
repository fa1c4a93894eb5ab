from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from ember.data.columns import default_label_names, remove_unused_columns, signature_columns, unwrap_model

torch.set_num_threads(1)

LOGGER = "ember.data.columns"


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, input_ids: Any, attention_mask: Any = None, labels: Any = None) -> Any:
        return input_ids


class KwargsModel(nn.Module):
    """Like every transformers 5 model: named inputs, then **kwargs for backend options."""

    def forward(self, input_ids: Any, **kwargs: Any) -> Any:
        return input_ids


class OnlyKwargsModel(nn.Module):
    def forward(self, **batch: Any) -> Any:
        return batch


class DDPLike(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class PeftLike(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def get_base_model(self) -> nn.Module:
        return self.base

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)


def rows(n: int = 3) -> list[dict[str, Any]]:
    return [{"input_ids": [i], "label": i, "text": f"s{i}", "idx": i} for i in range(n)]


def dropped_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_signature_columns_unwraps_and_honours_kwargs() -> None:
    assert signature_columns(Model()) == ["input_ids", "attention_mask", "labels"]
    assert signature_columns(DDPLike(PeftLike(Model()))) == ["input_ids", "attention_mask", "labels"]
    assert type(unwrap_model(DDPLike(Model()))) is Model
    assert signature_columns(KwargsModel()) == ["input_ids"]
    assert signature_columns(OnlyKwargsModel()) is None


def test_list_of_dicts_pruned_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = rows()
    pruned = remove_unused_columns(data, Model(), label_names=["labels"], description="training")
    assert len(pruned) == 3
    assert pruned[1] == {"input_ids": [1], "label": 1}
    assert pruned.__getitems__([0, 2]) == [{"input_ids": [0], "label": 0}, {"input_ids": [2], "label": 2}]
    remove_unused_columns(data, Model(), label_names=["labels"], description="training")
    messages = dropped_messages(caplog)
    assert len(messages) == 1
    assert "text" in messages[0] and "idx" in messages[0] and "Model.forward" in messages[0]
    assert "input_ids" not in messages[0]


def test_extra_keep_and_label_names_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = [{"input_ids": [1], "text": "a", "target": 3}]
    pruned = remove_unused_columns(data, Model(), label_names=["target"], extra_keep=["text"])
    assert pruned[0] == {"input_ids": [1], "text": "a", "target": 3}
    assert dropped_messages(caplog) == []


def test_only_kwargs_model_keeps_everything_named_inputs_win_over_kwargs() -> None:
    data = rows()
    assert remove_unused_columns(data, OnlyKwargsModel(), None) is data
    assert remove_unused_columns(data, KwargsModel(), None)[0] == {"input_ids": [0], "label": 0}


def test_torch_dataset_peek_keeps_the_rng_stream() -> None:
    class Random(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": torch.rand(2), "noise": 1}

    model = Model()
    state = torch.get_rng_state()
    pruned = remove_unused_columns(Random(), model, None)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(pruned[0]) == {"input_ids"}


def test_no_matching_column_is_an_error() -> None:
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        remove_unused_columns([{"text": "a"}], Model(), None)


def test_column_dataset_uses_remove_columns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    class ColumnData:
        def __init__(self, names: list[str]) -> None:
            self.column_names = names

        def remove_columns(self, names: list[str]) -> ColumnData:
            return ColumnData([c for c in self.column_names if c not in names])

    pruned = remove_unused_columns(ColumnData(["input_ids", "labels", "text"]), Model(), None)
    assert pruned.column_names == ["input_ids", "labels"]
    assert len(dropped_messages(caplog)) == 1 and "text" in dropped_messages(caplog)[0]


def test_iterable_dataset_is_filtered_while_streaming(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    class Stream(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(rows(2))

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

    pruned = remove_unused_columns(Stream(), Model(), None)
    assert isinstance(pruned, IterableDataset)
    assert list(pruned) == [{"input_ids": [0], "label": 0}, {"input_ids": [1], "label": 1}]
    list(pruned)
    pruned.set_epoch(2)
    assert len(dropped_messages(caplog)) == 1


def test_default_label_names_follow_the_forward() -> None:
    class QuestionAnswering(nn.Module):
        def forward(self, input_ids: Any, start_positions: Any = None, end_positions: Any = None) -> Any:
            return input_ids

    assert default_label_names(QuestionAnswering()) == ["start_positions", "end_positions"]
    assert default_label_names(Model()) == ["labels"]
    assert default_label_names(KwargsModel()) == ["labels"]
