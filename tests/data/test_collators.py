from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ember.data.collators import PaddingCollator, default_data_collator, pick_collator

torch.set_num_threads(1)

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the quick brown fox jumps over the lazy dog",
    "hello world",
]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_default_collator_types_and_label_renames() -> None:
    features = [
        {
            "label": 1,
            "x": 0.5,
            "ids": [1, 2],
            "t": torch.ones(3),
            "a": np.zeros(2),
            "text": "hi",
            "none": None,
        },
        {
            "label": 0,
            "x": 1.5,
            "ids": [3, 4],
            "t": torch.zeros(3),
            "a": np.ones(2),
            "text": "yo",
            "none": None,
        },
    ]
    batch = default_data_collator(features)
    assert set(batch) == {"labels", "x", "ids", "t", "a"}
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert batch["x"].dtype == torch.float32
    assert batch["ids"].dtype == torch.long and batch["ids"].shape == (2, 2)
    assert batch["t"].shape == (2, 3) and batch["a"].shape == (2, 2)


def test_default_collator_float_label_and_label_ids() -> None:
    assert default_data_collator([{"label": 0.5}, {"label": 1.0}])["labels"].dtype == torch.float32
    batch = default_data_collator([{"label_ids": [1, 2]}, {"label_ids": [3, 4]}])
    assert batch["labels"].tolist() == [[1, 2], [3, 4]] and batch["labels"].dtype == torch.long
    assert "label_ids" not in batch


def test_default_collator_drops_string_lists_and_accepts_objects() -> None:
    batch = default_data_collator([SimpleNamespace(tags=["a"], y=1), SimpleNamespace(tags=["b"], y=2)])
    assert set(batch) == {"y"}


def test_default_collator_ragged_error_names_the_feature() -> None:
    with pytest.raises(ValueError, match="input_ids.*PaddingCollator"):
        default_data_collator([{"input_ids": [1, 2]}, {"input_ids": [1]}])


def test_padding_matches_transformers(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from transformers import DataCollatorWithPadding

    features = [dict(tokenizer(s)) for s in SENTENCES]
    ours = PaddingCollator(tokenizer)(features)
    theirs = DataCollatorWithPadding(tokenizer)(features)
    assert ours["input_ids"].dtype == torch.long
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"][3, -1].item() == tokenizer.pad_token_id


def test_padding_labels_with_minus_100_and_multiple_of(tokenizer) -> None:  # type: ignore[no-untyped-def]
    features = [{"input_ids": ids, "labels": ids} for ids in tokenizer(SENTENCES[2:])["input_ids"]]
    batch = PaddingCollator(tokenizer, pad_to_multiple_of=8)(features)
    longest = max(len(f["input_ids"]) for f in features)
    width = -(-longest // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    short = len(features[1]["input_ids"])
    assert batch["labels"][1, short:].eq(-100).all() and batch["labels"][1, :short].ge(0).all()
    assert batch["attention_mask"][1].sum().item() == short


def test_padding_left_side_scalar_labels_and_extra_features(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer.padding_side = "left"
    try:
        features = [{"input_ids": [5, 6, 7], "label": 1, "w": 0.5}, {"input_ids": [8], "label": 0, "w": 1.0}]
        batch = PaddingCollator(tokenizer)(features)
    finally:
        tokenizer.padding_side = "right"
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [1, 0] and batch["w"].tolist() == [0.5, 1.0]


def test_padding_without_labels_or_pad_token() -> None:
    tok = SimpleNamespace(pad_token_id=None, padding_side="right", model_input_names=["input_ids"], pad=None)
    same = PaddingCollator(tok)([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])
    assert set(same) == {"input_ids"} and same["input_ids"].tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="pad_token"):
        PaddingCollator(tok)([{"input_ids": [1, 2]}, {"input_ids": [3]}])


def test_pick_collator(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(pick_collator(tokenizer), PaddingCollator)
    assert pick_collator(None) is default_data_collator
    assert pick_collator(object()) is default_data_collator
