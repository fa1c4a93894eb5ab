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


# -- the job the multi-process tests run, and its single-process reference ------------------------------

JOB_TRAIN, JOB_EVAL, JOB_TEST = 240, 13, 7


def job_trainer(out: str, kind: str = "bart", **kw: Any) -> Any:
    """Seq2SeqTrainer on the copy task (targets of several lengths), GA=2, generating with 4 beams."""
    from ember import Seq2SeqTrainer, Seq2SeqTrainingArguments

    fields: dict[str, Any] = dict(
        output_dir=out,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=30,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=True,
        seed=0,
        optim="adamw_torch",
        # rounding noise on a zero gradient must not become an Adam step (see worker.lm_args)
        adam_epsilon=1e-6,
        predict_with_generate=True,
        generation_num_beams=4,
        generation_max_length=12,
    )
    fields.update(kw)
    model = MODELS[kind]()
    eos = model.config.eos_token_id
    return Seq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(**fields),
        train_dataset=copy_examples(JOB_TRAIN, 0, eos, fixed_target=False),
        eval_dataset=copy_examples(JOB_EVAL, 1, eos, fixed_target=False),
        data_collator=collator_for(model),
        compute_metrics=generation_metrics,
    )


def run_job(trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train, evaluate (4 beams) and predict (greedy); the full weights, predictions and numbers."""
    result = trainer.train()
    metrics = trainer.evaluate()
    eos = trainer.model.config.eos_token_id
    pred = trainer.predict(copy_examples(JOB_TEST, 2, eos, fixed_target=False), num_beams=1)
    full = trainer.strategy.model_state_dict(trainer.model_wrapped)
    tensors = {f"param.{k}": v.detach().float().cpu().clone() for k, v in full.items()}
    tensors["predictions"] = torch.from_numpy(pred.predictions)
    tensors["label_ids"] = torch.from_numpy(pred.label_ids)
    meta = {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "train_loss": result.training_loss,
        "eval": {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))},
        "test": {k: v for k, v in pred.metrics.items() if not k.endswith(("_runtime", "_per_second"))},
        "shards_parameters": bool(trainer.strategy.shards_parameters),
    }
    return tensors, meta
