"""Drop dataset columns the model's forward does not accept (HF `remove_unused_columns`)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from ..utils import base_model as unwrap_model
from .samplers import fork_rng

__all__ = [
    "ColumnFilter",
    "IterableColumnFilter",
    "default_label_names",
    "remove_unused_columns",
    "signature_columns",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

_LABEL_COLUMNS = ("label", "label_ids")
# (id(dataset), description, dropped) already reported: the trainer rebuilds eval loaders at
# every evaluation and the message should appear once, not once per evaluation.
_reported: set[tuple[int, str, tuple[str, ...]]] = set()


def signature_columns(model: Any) -> list[str] | None:
    """Named arguments of the model's forward; None when it names none and takes `**kwargs`.

    transformers 5 models all end their forward with `**kwargs` (for attention backends and
    loss options), yet their named arguments are the real inputs: transformers prunes by the
    named ones, and so do we. Only a forward that is nothing but `**kwargs` keeps every column.
    """
    params = inspect.signature(unwrap_model(model).forward).parameters.values()
    named = [
        p.name
        for p in params
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if not named and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return named


def default_label_names(model: Any) -> list[str]:
    """The label columns when `label_names` is not set: a forward taking both `start_positions` and
    `end_positions` (question answering) is labelled by them, every other model by `labels`."""
    params = signature_columns(model) or []
    if "start_positions" in params and "end_positions" in params:
        return ["start_positions", "end_positions"]
    return ["labels"]


def _report(dataset: Any, dropped: list[str], model_name: str, description: str | None) -> None:
    key = (id(dataset), description or "", tuple(dropped))
    if not dropped or key in _reported:
        return
    _reported.add(key)
    where = f" in the {description} set" if description else ""
    logger.info(
        "The following columns%s are not arguments of `%s.forward` and have been dropped: %s. "
        "Set remove_unused_columns=False to keep them.",
        where,
        model_name,
        ", ".join(dropped),
    )


def _check_kept(columns: Collection[str], keep: frozenset[str], model_name: str) -> None:
    if columns and not any(c in keep for c in columns):
        raise ValueError(
            f"no column of the dataset ({', '.join(columns)}) is an argument of `{model_name}.forward` "
            f"({', '.join(sorted(keep))}); rename the columns or set remove_unused_columns=False"
        )


class ColumnFilter(Dataset):  # type: ignore[type-arg]
    """A map-style dataset whose dict items keep only the `keep` keys."""

    def __init__(self, dataset: Any, keep: frozenset[str]) -> None:
        self.dataset = dataset
        self.keep = keep

    def __len__(self) -> int:
        return len(self.dataset)

    def _filter(self, item: Any) -> Any:
        if isinstance(item, Mapping):
            return {k: v for k, v in item.items() if k in self.keep}
        return item

    def __getitem__(self, index: Any) -> Any:
        return self._filter(self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[Any]:
        inner = getattr(self.dataset, "__getitems__", None)
        items = inner(indices) if inner is not None else [self.dataset[i] for i in indices]
        return [self._filter(item) for item in items]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "keep"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class IterableColumnFilter(IterableDataset):  # type: ignore[type-arg]
    """An iterable dataset whose dict items keep only the `keep` keys.

    Columns are only known once items flow, so the message is logged at the first item
    (by each worker process when workers iterate).
    """

    def __init__(self, dataset: Any, keep: frozenset[str], model_name: str, description: str | None) -> None:
        self.dataset = dataset
        self.keep = keep
        self.model_name = model_name
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Any]:
        checked = False
        for item in self.dataset:
            if isinstance(item, Mapping):
                if not checked:
                    checked = True
                    _check_kept(list(item), self.keep, self.model_name)
                    _report(
                        self.dataset,
                        [k for k in item if k not in self.keep],
                        self.model_name,
                        self.description,
                    )
                item = {k: v for k, v in item.items() if k in self.keep}
            yield item

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "keep", "model_name", "description"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _is_column_dataset(dataset: Any) -> bool:
    names = getattr(dataset, "column_names", None)
    return isinstance(names, (list, tuple)) and callable(getattr(dataset, "remove_columns", None))


def _first_item(dataset: Any) -> Any:
    if isinstance(dataset, (list, tuple)):
        return dataset[0]
    # A user dataset may draw random numbers; peeking must not shift anyone's stream.
    with fork_rng(0):
        return dataset[0]


def remove_unused_columns(
    dataset: Any,
    model: Any,
    label_names: Collection[str] | None = None,
    extra_keep: Collection[str] = (),
    description: str | None = None,
) -> Any:
    """`dataset` without the columns `model.forward` does not take.

    Kept: forward's arguments, "label", "label_ids", `label_names` and `extra_keep`; a forward
    with `**kwargs` keeps everything. A `datasets.Dataset` (anything with `column_names` and
    `remove_columns`) gets `remove_columns`; other map-style datasets (lists of dicts, torch
    datasets of dicts) and iterable datasets are wrapped. The dropped columns are logged once.
    """
    columns = signature_columns(model)
    if columns is None:
        return dataset
    keep = frozenset([*columns, *_LABEL_COLUMNS, *(label_names or ()), *extra_keep])
    model_name = type(unwrap_model(model)).__name__
    if _is_column_dataset(dataset):
        names = list(dataset.column_names)
        _check_kept(names, keep, model_name)
        dropped = [c for c in names if c not in keep]
        _report(dataset, dropped, model_name, description)
        return dataset.remove_columns(dropped) if dropped else dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        return IterableColumnFilter(dataset, keep, model_name, description)
    if len(dataset) > 0:
        first = _first_item(dataset)
        if isinstance(first, Mapping):
            _check_kept(list(first), keep, model_name)
            _report(dataset, [k for k in first if k not in keep], model_name, description)
    return ColumnFilter(dataset, keep)
