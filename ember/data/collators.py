"""Collate functions: `default_data_collator` (HF semantics) and dynamic padding."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from numbers import Number
from typing import Any

import numpy as np
import torch

__all__ = ["PaddingCollator", "default_data_collator", "pick_collator"]

_LABEL_KEYS = ("label", "label_ids")
# Pad value per key; None means the tokenizer's pad token id.
_PAD_VALUES: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "token_type_ids": 0,
    "special_tokens_mask": 1,
}


def _as_dicts(features: Sequence[Any]) -> list[Mapping[str, Any]]:
    if not features:
        raise ValueError("cannot collate an empty batch: the DataLoader passed no features")
    if isinstance(features[0], Mapping):
        return list(features)
    return [vars(f) for f in features]


def _leaf(value: Any) -> Any:
    while isinstance(value, (list, tuple)) and len(value) > 0:
        value = value[0]
    return value


def _is_numeric_scalar(value: Any) -> bool:
    return isinstance(value, (Number, np.generic)) and not isinstance(value, (str, bytes))


def _stack(key: str, values: list[Any]) -> torch.Tensor | None:
    """One feature across the batch as a tensor, or None when it cannot be a tensor."""
    first = values[0]
    try:
        if isinstance(first, torch.Tensor):
            return torch.stack(values)
        if isinstance(first, np.ndarray):
            return torch.from_numpy(np.stack(values))
        if _is_numeric_scalar(first):
            return torch.tensor(values)
        if isinstance(first, (list, tuple)):
            leaf = _leaf(first)
            if _is_numeric_scalar(leaf) or (isinstance(leaf, (list, tuple)) and len(leaf) == 0):
                return torch.tensor(values)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"cannot collate feature `{key}`: its values differ in shape across the batch ({err}); "
            "pad them, e.g. with PaddingCollator(tokenizer), or pass a data_collator"
        ) from err
    return None


def _label_tensor(values: list[Any]) -> torch.Tensor:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values) if first.dim() > 0 else torch.stack(values).reshape(len(values))
    leaf = _leaf(first)
    if isinstance(leaf, torch.Tensor):
        leaf = leaf.item()
    dtype = torch.long if isinstance(leaf, (int, np.integer)) and not isinstance(leaf, bool) else torch.float
    if isinstance(first, np.ndarray):
        return torch.from_numpy(np.stack(values)).to(dtype)
    return torch.tensor(values, dtype=dtype)


def default_data_collator(features: Sequence[Any]) -> dict[str, Any]:
    """Stack a list of dict-like features into a dict of tensors.

    `label` (one number per example) and `label_ids` become `labels` (long for ints, float
    otherwise). Tensors are stacked, numbers and nested lists of numbers become tensors; values
    that cannot be tensors (None, strings, lists of strings, ...) are left out, as in HF.
    """
    rows = _as_dicts(features)
    first = rows[0]
    batch: dict[str, Any] = {}
    label_key = next((k for k in _LABEL_KEYS if first.get(k) is not None), None)
    if label_key is not None:
        batch["labels"] = _label_tensor([row[label_key] for row in rows])
    for key, value in first.items():
        if key in _LABEL_KEYS or value is None or isinstance(value, (str, bytes)):
            continue
        tensor = _stack(key, [row[key] for row in rows])
        if tensor is not None:
            batch[key] = tensor
    return batch


def _to_list(value: Any) -> list[Any]:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()  # type: ignore[no-any-return]
    return list(value)


def _is_sequence(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim >= 1
    return isinstance(value, (list, tuple))


class PaddingCollator:
    """Pads token features to the longest in the batch (dynamic padding).

    `input_ids` get the tokenizer's pad token, `attention_mask`/`token_type_ids` zeros (an
    attention mask is added when missing), on the tokenizer's `padding_side`. Sequence labels
    (`labels`, `label`, `label_ids`) are padded with `label_pad_token_id` (-100, ignored by the
    loss) to the padded input length; scalar labels are stacked. Other features go through
    `default_data_collator`.
    """

    def __init__(
        self,
        tokenizer: Any,
        pad_to_multiple_of: int | None = None,
        label_pad_token_id: int = -100,
    ) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"`pad_to_multiple_of` must be >= 1 or None, got {pad_to_multiple_of}")
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_token_id = label_pad_token_id

    def _target_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if m is None else -(-longest // m) * m

    def _pad(self, rows: list[list[Any]], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for i, row in enumerate(rows):
            if row:
                target = out[i, length - len(row) :] if left else out[i, : len(row)]
                target.copy_(torch.as_tensor(row, dtype=torch.long))
        return out

    def _pad_value(self, key: str, rows: list[list[Any]]) -> int:
        value = _PAD_VALUES[key]
        if key == "token_type_ids":
            value = getattr(self.tokenizer, "pad_token_type_id", 0)
        if value is None:
            value = getattr(self.tokenizer, "pad_token_id", None)
            if value is None and len({len(r) for r in rows}) > 1:
                raise ValueError(
                    "the tokenizer has no pad token, so `input_ids` of different lengths cannot be padded; "
                    "set `tokenizer.pad_token` (e.g. `tokenizer.pad_token = tokenizer.eos_token`)"
                )
        return 0 if value is None else int(value)

    def _wants_mask(self) -> bool:
        names = getattr(self.tokenizer, "model_input_names", None)
        return names is None or "attention_mask" in names

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        rows = [dict(f) for f in _as_dicts(features)]
        label_key = next((k for k in ("labels", *_LABEL_KEYS) if rows[0].get(k) is not None), None)
        labels = [row.get(label_key) for row in rows] if label_key is not None else []
        for row in rows:
            for key in ("labels", *_LABEL_KEYS):
                row.pop(key, None)
        seqs = {k: [_to_list(row.pop(k)) for row in rows] for k in _PAD_VALUES if k in rows[0]}
        seq_labels = bool(labels) and _is_sequence(labels[0])
        label_rows = [_to_list(r) for r in labels] if seq_labels else []
        length = self._target_length(max((len(r) for key_rows in seqs.values() for r in key_rows), default=0))
        batch: dict[str, Any] = {k: self._pad(v, length, self._pad_value(k, v)) for k, v in seqs.items()}
        if "input_ids" in seqs and "attention_mask" not in seqs and self._wants_mask():
            batch["attention_mask"] = self._pad([[1] * len(r) for r in seqs["input_ids"]], length, 0)
        if seq_labels:
            # Labels longer than the inputs (seq2seq targets) keep their own length.
            label_length = max(length, self._target_length(max(len(r) for r in label_rows)))
            batch["labels"] = self._pad(label_rows, label_length, self.label_pad_token_id)
        elif labels:
            batch["labels"] = _label_tensor(labels)
        if rows[0]:
            batch.update(default_data_collator(rows))
        return batch


def pick_collator(processing_class: Any) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """The collator the Trainer uses when none is given: dynamic padding for a tokenizer
    (anything with `pad` and `pad_token_id`), `default_data_collator` otherwise."""
    if (
        processing_class is not None
        and hasattr(processing_class, "pad")
        and hasattr(processing_class, "pad_token_id")
    ):
        return PaddingCollator(processing_class)
    return default_data_collator
