"""Padding-free packing: a batch's examples side by side in one row, kept apart by `position_ids`.

A padded batch of variable-length text spends compute on pad tokens (the longest example sets
the width of every row). `PackingCollator` concatenates the examples instead, with
`position_ids` restarting at 0 for each one and no `attention_mask`. transformers (5.x) models
whose masks come from `transformers.masking_utils` (GPT-2, Llama, Mistral, Qwen, ... with sdpa,
eager or flash attention) read a restart of `position_ids` as the start of a new sequence and
build a block-diagonal causal mask, so no example attends to another: each example's losses are
those it has alone (tests/data/test_packing.py checks this per token). A model that does not
derive its mask from `position_ids` would let examples see each other: check before relying on it.

Labels: the first token of every example gets -100. After the causal shift inside the model the
label at position j is predicted from position j-1, so without it the last token of one example
would be trained to predict the first token of the next. With it the targets are exactly those of
the examples alone (each example's first token is never a target), and ember's normalisation
(target count of the whole step) gives the same per-token mean loss as padding.

`use_cache=False` travels in the batch: transformers 5 turns packing detection off when a KV cache
exists, and GPT-2/Llama create one whenever `use_cache` is on (their config default, also in
training), in which case the examples of a row would attend to each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..engine.loss import IGNORE_INDEX

__all__ = ["STRATEGIES", "PackingCollator"]

STRATEGIES = ("best_fit", "in_order")
_SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask", "token_type_ids")


def _as_list(value: Any, key: str) -> list[int]:
    if isinstance(value, torch.Tensor) or hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or (value and isinstance(value[0], (list, tuple))):
        raise ValueError(
            f"PackingCollator: `{key}` of one example must be a flat sequence of token ids, got "
            f"{type(value).__name__}; pass unpadded, untruncated-to-batch examples (one sequence each)."
        )
    return [int(v) for v in value]


class PackingCollator:
    """Collate a list of tokenised examples into packed rows, without padding between examples.

    Without `max_length` the whole batch becomes one row (batch dimension 1). With it, rows hold
    at most `max_length` tokens, so attention (quadratic in the row length on kernels that apply
    the mask densely) stays bounded; rows are then padded to the longest one. How examples are
    placed (`strategy`):
    - "best_fit" (default): longest example first, each into the fullest row it still fits in
      (best-fit decreasing). Rows come out nearly full, so there are fewer of them and less
      padding: on BBC News articles in rows of 1024 tokens, 8 articles a batch, it packs the same
      tokens into fewer rows than in order (see bench/results/packing-1024*.md).
    - "in_order": the batch's order, a new row starting when the next example would not fit.
    The loss is the same either way (each example's tokens see only that example).

    Returns `input_ids`, `labels` and `position_ids` of shape (rows, tokens) (and
    `token_type_ids` when the examples have them), and `use_cache=False` (see the module
    docstring). Labels come from each example's `labels` or, without them, from its `input_ids`;
    the first token of each example is -100 (see the module docstring). No `attention_mask` is
    returned: the model must see None to detect the packing; an example's own attention mask, if
    present, must be all ones (padding inside an example cannot be packed).

    Padding (to the longest row, then to `pad_to_multiple_of`) is `pad_token_id` with label -100
    at the end of a row, so nothing real attends to it; its position repeats the row's last one
    (1 if that is 0), which stays inside the model's position table.
    """

    def __init__(
        self,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        pad_token_id: int = 0,
        strategy: str = "best_fit",
    ) -> None:
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and value < 1:
                raise ValueError(f"PackingCollator: `{name}` must be >= 1 or None, got {value}.")
        if strategy not in STRATEGIES:
            raise ValueError(
                f"PackingCollator: `strategy` must be one of {list(STRATEGIES)}, got {strategy!r}."
            )
        self.strategy = strategy
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("PackingCollator: cannot collate an empty batch.")
        with_types = "token_type_ids" in features[0]
        examples = []
        for i, feature in enumerate(features):
            example = _example(i, feature, with_types)
            if example is None:
                continue
            n = len(example[0])
            if self.max_length is not None and n > self.max_length:
                raise ValueError(
                    f"PackingCollator: example {i} has {n} tokens, more than max_length={self.max_length}; "
                    "truncate it when tokenising or raise max_length."
                )
            examples.append(example)
        if not examples:
            raise ValueError("PackingCollator: every example in the batch is empty.")
        rows = self._place(examples)
        width = self._width(max(len(r.ids) for r in rows))
        for row in rows:
            row.pad_to(width, self.pad_token_id)
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([r.ids for r in rows], dtype=torch.long),
            "labels": torch.tensor([r.labels for r in rows], dtype=torch.long),
            "position_ids": torch.tensor([r.positions for r in rows], dtype=torch.long),
        }
        if with_types:
            batch["token_type_ids"] = torch.tensor([r.types for r in rows], dtype=torch.long)
        batch["use_cache"] = False
        return batch

    def _place(self, examples: list[tuple[list[int], ...]]) -> list[_Row]:
        limit = self.max_length
        rows: list[_Row] = []
        if limit is None or self.strategy == "in_order":
            for example in examples:
                if not rows or (limit is not None and len(rows[-1].ids) + len(example[0]) > limit):
                    rows.append(_Row())
                rows[-1].add(*example)
            return rows
        # Best-fit decreasing; sorted() is stable, so equal lengths keep the batch's order and the
        # layout is a function of the batch alone (the same on every run and every resume).
        for example in sorted(examples, key=lambda e: -len(e[0])):
            n = len(example[0])
            fits = [row for row in rows if len(row.ids) + n <= limit]
            if fits:
                max(fits, key=lambda row: len(row.ids)).add(*example)
            else:
                rows.append(_Row())
                rows[-1].add(*example)
        return rows

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if m is None else -(-longest // m) * m


def _example(i: int, feature: Mapping[str, Any], with_types: bool) -> tuple[list[int], ...] | None:
    """(input_ids, labels, token_type_ids) of one example, checked; None when it is empty."""
    tokens = _as_list(feature["input_ids"], "input_ids")
    if not tokens:
        return None
    own = _as_list(feature["labels"], "labels") if feature.get("labels") is not None else tokens
    if len(own) != len(tokens):
        raise ValueError(
            f"PackingCollator: example {i} has {len(tokens)} input_ids but {len(own)} labels; "
            "packing needs one label per token (causal LM labels = input_ids)."
        )
    mask = feature.get("attention_mask")
    if mask is not None and 0 in _as_list(mask, "attention_mask"):
        raise ValueError(
            f"PackingCollator: example {i} has padding (attention_mask 0); pass unpadded examples."
        )
    types = _as_list(feature["token_type_ids"], "token_type_ids") if with_types else []
    return tokens, own, types


class _Row:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.positions: list[int] = []
        self.types: list[int] = []

    def add(self, tokens: list[int], labels: list[int], types: list[int]) -> None:
        self.ids += tokens
        self.labels += [IGNORE_INDEX, *labels[1:]]
        self.positions += range(len(tokens))
        self.types += types

    def pad_to(self, width: int, pad_token_id: int) -> None:
        pad = width - len(self.ids)
        if pad <= 0:
            return
        # Repeating the last position (never 0, never past the last example's length) keeps pad
        # tokens after the example in causal order, inside the model's position table, and out of
        # the sample count (restarts at 0).
        position = max(self.positions[-1], 1)
        self.ids += [pad_token_id] * pad
        self.labels += [IGNORE_INDEX] * pad
        self.positions += [position] * pad
        if self.types:
            self.types += [0] * pad
