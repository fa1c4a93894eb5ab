"""Padding-free packing: an example's losses do not change when others share its row."""

from __future__ import annotations

import pytest
import torch

from ember import Trainer, TrainingArguments
from ember.data import PackingCollator
from ember.engine.loss import count_targets
from tests.helpers import lm_examples, max_param_diff, pad_lm_batch, params_of, tiny_gpt2, tiny_llama

VOCAB = 97


MODELS = {"gpt2": lambda: tiny_gpt2(vocab=VOCAB), "llama": tiny_llama}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[j] from position j-1 (position 0 gets nan)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = torch.full(labels.shape, float("nan"))
    out[1:] = -logp[:-1].gather(-1, labels[1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return out


def test_collator_layout_and_boundary_labels():
    features = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 3]}, {"input_ids": [4]}]
    batch = PackingCollator()(features)
    assert batch.keys() == {"input_ids", "labels", "position_ids", "use_cache"}
    assert batch["use_cache"] is False  # a KV cache turns transformers' packing detection off
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # first token of every example: not a target (it would be predicted from the previous example)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 3, -100]]
    # the same target count as the examples padded one per row
    padded = pad_lm_batch(
        [{"input_ids": f["input_ids"], "labels": f.get("labels", f["input_ids"])} for f in features]
    )
    assert int(count_targets(batch, shift=True)) == int(count_targets(padded, shift=True)) == 3


def test_collator_pads_to_a_multiple_after_the_last_example():
    batch = PackingCollator(pad_to_multiple_of=4, pad_token_id=0)(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]


# Lengths 3, 2, 4, 1: rows of 4 or 5 tokens lay these out differently in order and best-fit.
FOUR = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8, 9]}, {"input_ids": [10]}]


def test_collator_fills_rows_up_to_max_length_and_pads_the_shorter_ones():
    batch = PackingCollator(max_length=5, pad_token_id=0, strategy="in_order")(FOUR)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    three = PackingCollator(max_length=4, strategy="in_order")(FOUR)
    assert three["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9], [10, 0, 0, 0]]
    assert three["position_ids"].tolist() == [[0, 1, 2, 2], [0, 1, 1, 1], [0, 1, 2, 3], [0, 1, 1, 1]]
    assert three["labels"].tolist()[1] == [-100, 5, -100, -100]
    with pytest.raises(ValueError, match="max_length=3"):
        PackingCollator(max_length=3)(FOUR)


def test_best_fit_fills_rows_longest_first_into_the_fullest_row_that_has_room():
    # in order this takes 4 rows of 4; longest first, [10] joins the fuller of the two rows it fits in
    rows = PackingCollator(max_length=4)(FOUR)
    assert rows["input_ids"].tolist() == [[6, 7, 8, 9], [1, 2, 3, 10], [4, 5, 0, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 1, 1]]
    assert rows["labels"].tolist() == [[-100, 7, 8, 9], [-100, 2, 3, -100], [-100, 5, -100, -100]]
    assert PackingCollator(max_length=5)(FOUR)["input_ids"].tolist() == [
        [6, 7, 8, 9, 10],
        [1, 2, 3, 4, 5],
    ]
    # without max_length there is one row, in the batch's order, whatever the strategy
    assert PackingCollator()(FOUR)["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    with pytest.raises(ValueError, match="strategy"):
        PackingCollator(max_length=4, strategy="first_fit")


@pytest.mark.parametrize("strategy", ["best_fit", "in_order"])
def test_rows_of_either_strategy_give_the_padded_loss(strategy):
    model = tiny_llama()
    examples = lm_examples(9, vocab=VOCAB, seed=7, min_len=3, max_len=20)
    packed = PackingCollator(max_length=24, strategy=strategy)(examples)
    assert packed["input_ids"].shape[1] <= 24 and packed["input_ids"].shape[0] > 1
    loss = model(**packed).loss
    padded = model(**pad_lm_batch(examples)).loss
    assert float(loss.detach()) == pytest.approx(float(padded.detach()), rel=1e-5)


def test_best_fit_needs_fewer_rows_than_in_order():
    rows = {"best_fit": 0, "in_order": 0}
    for seed in range(20):
        examples = lm_examples(12, vocab=VOCAB, seed=seed, min_len=2, max_len=30)
        ids = {k: PackingCollator(max_length=32, strategy=k)(examples)["input_ids"] for k in rows}
        assert int((ids["best_fit"] != 0).sum()) == int((ids["in_order"] != 0).sum())  # same tokens
        for k in rows:
            rows[k] += ids[k].shape[0]
    assert rows["best_fit"] < 0.9 * rows["in_order"], rows


def test_collator_rejects_padded_or_mismatched_examples():
    with pytest.raises(ValueError, match="attention_mask"):
        PackingCollator()([{"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}])
    with pytest.raises(ValueError, match="labels"):
        PackingCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PackingCollator(pad_to_multiple_of=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_each_example_has_the_losses_it_has_alone(name, attn):
    model = MODELS[name]().eval()
    model.set_attn_implementation(attn)
    examples = lm_examples(5, vocab=VOCAB, seed=4, min_len=4, max_len=15)
    batch = PackingCollator()(examples)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        rows = PackingCollator(max_length=24, strategy="in_order")(examples)  # several rows, padded
        assert rows["input_ids"].shape[0] > 1 and (rows["labels"][:, -1] == -100).any()
        in_rows = model(**{k: v for k, v in rows.items() if k != "labels"}).logits
        row, col = 0, 0
        start = 0
        for ex in examples:
            n = len(ex["input_ids"])
            ids = torch.tensor(ex["input_ids"])
            alone = model(input_ids=ids[None]).logits[0]
            mine = packed[start : start + n]
            assert torch.allclose(mine, alone, atol=1e-5), float((mine - alone).abs().max())
            got = token_losses(mine, ids)[1:]
            ref = token_losses(alone, ids)[1:]
            assert torch.allclose(got, ref, atol=1e-5)
            start += n
            if col + n > 24:
                row, col = row + 1, 0
            assert torch.allclose(in_rows[row, col : col + n], alone, atol=1e-5)
            col += n
        # the check can fail: without position_ids, or with a KV cache, the examples see each other
        n0 = len(examples[0]["input_ids"])
        for leaky_inputs in ({}, {"position_ids": batch["position_ids"], "use_cache": True}):
            leaky = model(input_ids=batch["input_ids"], **leaky_inputs).logits[0]
            assert not torch.allclose(leaky[n0 : n0 + 3], packed[n0 : n0 + 3], atol=1e-3)


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_loss_is_the_per_token_mean_of_the_examples(name):
    model = MODELS[name]()
    examples = lm_examples(6, vocab=VOCAB, seed=5)
    packed = model(**PackingCollator()(examples)).loss
    padded = model(**pad_lm_batch(examples)).loss
    assert float(packed.detach()) == pytest.approx(float(padded.detach()), rel=1e-5)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        optim="adamw_torch",
        adam_epsilon=1e-6,  # see tests/engine/test_chunked_loss.py
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("chunked", [False, True])
def test_trainer_with_gradient_accumulation_packed_equals_padded(tmp_path, chunked, monkeypatch):
    from tests.engine.test_chunked_loss import count_chunked_calls

    calls = count_chunked_calls(monkeypatch)
    runs = {}
    for name, collator in (("padded", pad_lm_batch), ("packed", PackingCollator())):
        trainer = Trainer(
            tiny_llama(),
            _args(tmp_path / name, chunked_loss=chunked and name == "packed", loss_chunk_size=16),
            train_dataset=lm_examples(16, vocab=VOCAB, seed=6),
            data_collator=collator,
        )
        trainer.train()
        runs[name] = (trainer, [h for h in trainer.state.log_history if "loss" in h])
    padded, packed = runs["padded"], runs["packed"]
    assert [h["loss"] for h in packed[1]] == pytest.approx([h["loss"] for h in padded[1]], rel=1e-5)
    assert max_param_diff(params_of(packed[0].model), params_of(padded[0].model)) < 1e-5
    assert len(calls) == (8 if chunked else 0)
