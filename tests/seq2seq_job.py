"""The seq2seq job of the Seq2SeqTrainer tests (one process and several): tiny BART and T5 built from
configs, a copy task (the target is the first tokens of the source) that they learn in a few dozen
steps, so generation gives varied, non-trivial outputs, a padding collator, and token metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

VOCAB = 20
FIRST_WORD = 5  # ids below are special (pad, eos, start) in both models
TARGET_LEN = 3


def tiny_bart(seed: int = 0) -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    return BartForConditionalGeneration(config)


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


MODELS = {"bart": tiny_bart, "t5": tiny_t5}


def copy_examples(
    n: int, seed: int, eos: int, fixed_target: bool = True, min_len: int = 5, max_len: int = 9
) -> list[dict[str, list[int]]]:
    """Sources of min_len..max_len words + EOS; the target is the first TARGET_LEN words + EOS
    (`fixed_target`), or the first 2..TARGET_LEN words (targets of several lengths)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        src = torch.randint(FIRST_WORD, VOCAB, (length,), generator=g).tolist()
        keep = TARGET_LEN if fixed_target else int(torch.randint(2, TARGET_LEN + 1, (1,), generator=g))
        out.append(
            {"input_ids": src + [eos], "attention_mask": [1] * (length + 1), "labels": src[:keep] + [eos]}
        )
    return out


class Seq2SeqCollator:
    """Right-pads sources with the pad id and labels with -100, and builds decoder_input_ids from the
    labels (shifted right after the decoder start token) as DataCollatorForSeq2Seq does with a model."""

    def __init__(self, pad: int, start: int) -> None:
        self.pad, self.start = pad, start

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        src_len = max(len(f["input_ids"]) for f in features)
        out: dict[str, torch.Tensor] = {
            "input_ids": torch.tensor(
                [f["input_ids"] + [self.pad] * (src_len - len(f["input_ids"])) for f in features]
            ),
            "attention_mask": torch.tensor(
                [f["attention_mask"] + [0] * (src_len - len(f["attention_mask"])) for f in features]
            ),
        }
        if "labels" in features[0]:
            tgt_len = max(len(f["labels"]) for f in features)
            labels = torch.tensor([f["labels"] + [-100] * (tgt_len - len(f["labels"])) for f in features])
            decoder = torch.full_like(labels, self.start)
            decoder[:, 1:] = labels[:, :-1]
            out["labels"] = labels
            out["decoder_input_ids"] = decoder.masked_fill(decoder == -100, self.pad)
        return out


def collator_for(model: nn.Module) -> Seq2SeqCollator:
    return Seq2SeqCollator(model.config.pad_token_id, model.config.decoder_start_token_id)


def words(row: np.ndarray, special: int = FIRST_WORD) -> list[int]:
    """The word ids of a generated row or a label row (special tokens, pads and -100 dropped)."""
    return [int(t) for t in row if t >= special]


def generation_metrics(pred: Any) -> dict[str, float]:
    """What a ROUGE/BLEU-style compute_metrics does with generated ids: compare decoded sequences."""
    preds, labels = pred.predictions, pred.label_ids
    exact, overlap, lengths = [], [], []
    for p, y in zip(preds, labels):
        got, want = words(p), words(y)
        exact.append(float(got == want))
        overlap.append(len(set(got) & set(want)) / max(1, len(set(want))))
        lengths.append(len(got))
    return {
        "exact_match": float(np.mean(exact)),
        "overlap": float(np.mean(overlap)),
        "gen_len": float(np.mean(lengths)),
        "rows": float(len(preds)),
        "width": float(preds.shape[1]),
    }
