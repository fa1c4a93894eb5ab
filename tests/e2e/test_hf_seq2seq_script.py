"""The one-import switch for sequence-to-sequence work: a run_summarization-style script run from the
command line on transformers' Seq2SeqTrainer and, with only its import line changed, on ember's.

`summarization_style_script.py` parses model/data/Seq2SeqTrainingArguments with `HfArgumentParser`,
loads local JSON-lines files with `datasets`, tokenises with a word-level tokenizer built here offline
(`tokenizers` wrapped in `PreTrainedTokenizerFast`), trains a tiny BART, evaluates and predicts with
`predict_with_generate` (beam search, ROUGE-1-style metrics on decoded text) and writes the generated
summaries. Both runs must exit 0, write the same files and report the same numbers.

Sizes keep the two trainers' known differences out of the comparison (docs/compatibility.md): no
gradient accumulation (transformers does not divide BART's loss by it) and eval/test sets that are
whole batches (transformers' Seq2SeqTrainer over-weights a short last batch in eval_loss).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

HERE = Path(__file__).parent
REPO = HERE.parent.parent
HF_IMPORT = "from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments  # the one line a user changes"
EMBER_IMPORT = "from ember import Seq2SeqTrainer, Seq2SeqTrainingArguments  # the one line a user changes"
RESULT_FILES = {
    "train_results.json",
    "eval_results.json",
    "predict_results.json",
    "all_results.json",
    "trainer_state.json",
    "README.md",
    "generated_predictions.txt",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "script_done.json",
}
WORDS = [
    "river", "stone", "cloud", "market", "garden", "winter", "engine", "letter", "forest", "bridge",
    "harbor", "silver", "candle", "mirror", "valley", "thunder", "orchard", "lantern", "meadow", "canyon",
]  # fmt: skip
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # BART's ids 0..3


def _document(rng: random.Random) -> dict[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 10))]
    return {"document": " ".join(words), "summary": " ".join(words[:3])}


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf_seq2seq_script")
    model_dir = root / "tiny-bart"
    tokenizer = _tokenizer()
    config = transformers.BartConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
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
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    transformers.set_seed(0)
    transformers.BartForConditionalGeneration(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    _write_jsonl(root / "train.json", [_document(rng) for _ in range(256)])
    _write_jsonl(root / "validation.json", [_document(rng) for _ in range(16)])
    _write_jsonl(root / "test.json", [_document(rng) for _ in range(16)])
    script = (HERE / "summarization_style_script.py").read_text()
    assert script.count(HF_IMPORT) == 1
    (root / "run_hf.py").write_text(script)
    (root / "run_ember.py").write_text(script.replace(HF_IMPORT, EMBER_IMPORT))
    return root


def _run(root: Path, which: str) -> Path:
    out = root / f"out_{which}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        sys.executable, str(root / f"run_{which}.py"),
        "--model_name_or_path", str(root / "tiny-bart"),
        "--train_file", str(root / "train.json"),
        "--validation_file", str(root / "validation.json"),
        "--test_file", str(root / "test.json"),
        "--output_dir", str(out),
        "--do_train", "--do_eval", "--do_predict",
        "--predict_with_generate",
        "--generation_max_length", "8",
        "--generation_num_beams", "2",
        "--num_train_epochs", "5",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "5e-3",
        "--warmup_steps", "4",
        "--logging_steps", "8",
        "--eval_strategy", "epoch",
        "--save_strategy", "epoch",
        "--train_sampling_strategy", "sequential",
        "--seed", "0",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{which} script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def runs(workspace: Path) -> dict[str, Path]:
    return {which: _run(workspace, which) for which in ("hf", "ember")}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_both_scripts_write_the_same_files(runs: dict[str, Path]) -> None:
    for which, out in runs.items():
        missing = {name for name in RESULT_FILES if not (out / name).exists()}
        assert not missing, f"{which} did not write {sorted(missing)}"
    assert _json(runs["ember"] / "script_done.json")["trainer_module"].startswith("ember")
    assert _json(runs["hf"] / "script_done.json")["trainer_module"].startswith("transformers")
    hf_ckpts = sorted(p.name for p in runs["hf"].glob("checkpoint-*"))
    assert sorted(p.name for p in runs["ember"].glob("checkpoint-*")) == hf_ckpts


def test_metrics_on_generated_text_agree(runs: dict[str, Path]) -> None:
    hf, em = (_json(runs[w] / "all_results.json") for w in ("hf", "ember"))
    assert set(hf) <= set(em), f"ember lacks {sorted(set(hf) - set(em))}"
    for key in ("train_loss", "eval_loss", "predict_loss"):
        assert em[key] == pytest.approx(hf[key], rel=1e-4), key
    for key in (
        "eval_rouge1",
        "eval_exact_match",
        "eval_gen_len",
        "predict_rouge1",
        "predict_gen_len",
        "epoch",
    ):
        assert em[key] == pytest.approx(hf[key], abs=1e-9), key
    assert em["eval_rouge1"] > 50, "the task is learnable; the runs must learn some of it"
    generated = (runs["hf"] / "generated_predictions.txt").read_text()
    assert (runs["ember"] / "generated_predictions.txt").read_text() == generated
    assert len(set(generated.splitlines())) > 3


def test_log_history_agrees(runs: dict[str, Path]) -> None:
    hf, em = (_json(runs[w] / "trainer_state.json") for w in ("hf", "ember"))
    assert em["global_step"] == hf["global_step"]
    hf_steps = [e for e in hf["log_history"] if "loss" in e]
    em_steps = [e for e in em["log_history"] if "loss" in e]
    assert [e["step"] for e in em_steps] == [e["step"] for e in hf_steps]
    for a, b in zip(em_steps, hf_steps):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for key in ("eval_loss", "eval_rouge1", "eval_gen_len"):
        want = [e[key] for e in hf["log_history"] if key in e]
        assert [e[key] for e in em["log_history"] if key in e] == pytest.approx(want, rel=1e-4), key


def test_saved_model_generates_with_from_pretrained(runs: dict[str, Path]) -> None:
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(runs["ember"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(runs["ember"])
    ids = tokenizer(["river stone cloud market garden"], return_tensors="pt")
    out = model.generate(**ids, max_length=8)
    assert out.shape[0] == 1 and out.shape[1] <= 8
