"""`ember train` / `ember report`: a tiny end-to-end job, flag overrides, clear config errors."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ember.cli.main import build_model, format_report, main, read_logs
from ember.cli.textdata import build_texts, build_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def tiny_job(tmp: Path, **args: Any) -> dict[str, Any]:
    """A 1-layer GPT-2 on ~6 KB of Shakespeare with a 300-token BPE: a few seconds end to end."""
    return {
        "model": {"type": "gpt2", "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}},
        "tokenizer": {"train": "byte_level_bpe", "vocab_size": 300, "cache_dir": str(tmp / "cache")},
        "data": {"shakespeare": {"max_chars": 6000, "eval_max_chars": 2000, "block_size": 32}},
        "args": {
            "output_dir": str(tmp / "run"),
            "max_steps": 5,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "eval_strategy": "steps",
            "eval_steps": 2,
            "save_strategy": "no",
            "report_to": "jsonl",  # `ember report` reads logs.jsonl
            "disable_tqdm": True,
            "prediction_loss_only": True,
            **args,
        },
        "generate": {"prompt": "KING:\n", "max_new_tokens": 8},
    }


def write_job(tmp: Path, job: dict[str, Any], name: str = "job.yaml") -> str:
    path = tmp / name
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real `ember train` run (config says max_steps 5; the flag says 3), shared by the tests."""
    tmp = tmp_path_factory.mktemp("cli")
    config = write_job(tmp, tiny_job(tmp))
    out = io.StringIO()  # capsys is function-scoped; this fixture is shared by the module
    with contextlib.redirect_stdout(out):
        assert main(["train", config, "--max_steps", "3"]) == 0
    return tmp / "run", out.getvalue()


def test_train_writes_a_model_that_transformers_loads(trained: tuple[Path, str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = trained
    model = AutoModelForCausalLM.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert model.config.n_layer == 1 and model.config.vocab_size == len(tokenizer) == 300
    ids = tokenizer("KING:\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_train_prints_perplexity_and_a_sample(trained: tuple[Path, str]) -> None:
    run, stdout = trained
    assert "perplexity" in stdout and "sample:\nKING:" in stdout
    ppl = float(stdout.split("perplexity ")[-1].split()[0].rstrip(","))
    assert 1 < ppl < 1000  # a 300-token vocabulary: a random model sits near 300


def test_flag_overrides_the_config_value(trained: tuple[Path, str]) -> None:
    run, _ = trained
    records = read_logs(run / "logs.jsonl")
    assert max(r["step"] for r in records) == 3  # the file says 5
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("eval_loss" in r for r in records)


def test_tokenizer_is_cached(trained: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = trained
    cache = run.parent / "cache"
    (folder,) = cache.iterdir()
    assert folder.name.startswith("bpe-300-") and (folder / "tokenizer.json").is_file()
    splits = build_texts({"shakespeare": {"max_chars": 6000, "eval_max_chars": 2000}})
    spec = {"train": "byte_level_bpe", "vocab_size": 300, "cache_dir": str(cache)}
    before = (folder / "tokenizer.json").stat().st_mtime_ns
    assert len(build_tokenizer(spec, {}, splits.train)) == 300
    assert (folder / "tokenizer.json").stat().st_mtime_ns == before  # loaded, not retrained


def test_report_summarises_the_run(trained: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = trained
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    table = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert table["steps"].split()[-1] == "3"
    assert "eval perplexity last" in table and "train loss first / last" in table
    assert "train_samples_per_second" in table


def test_report_shows_the_last_run_of_a_reused_log(tmp_path: Path) -> None:
    lines = [
        {"step": 1, "loss": 9.0},
        {"step": 2, "loss": 8.0},
        {"step": 1, "loss": 5.0},
        {"step": 2, "loss": 4.0},
    ]
    (tmp_path / "logs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = read_logs(tmp_path / "logs.jsonl")
    assert [r["loss"] for r in records] == [5.0, 4.0]
    assert "5 / 4" in format_report(records)


def test_report_of_a_missing_run_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_help_lists_fields_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "ember train CONFIG.yaml" in out and "tokenizer:" in out
    assert "--learning_rate" in out and "[default: 5e-05]" in out
    assert "--per_device_train_batch_size INT" in out and "[default: 8]" in out


@pytest.mark.parametrize(
    ("change", "flags", "expected"),
    [
        (lambda j: j.update(modle=j.pop("model")), [], ["`modle`", "`model`"]),
        (lambda j: j["args"].update(learning_rat=1.0), [], ["args", "`learning_rat`", "'learning_rate'"]),
        (lambda j: None, ["--learning_rat", "1"], ["`learning_rat`", "'learning_rate'"]),
        (lambda j: j["args"].update(use_cache=True), [], ["`use_cache`"]),
        (lambda j: j["args"].update(eval_strategy="sometimes"), [], ["eval_strategy", "sometimes"]),
        (lambda j: j["model"].update(type="gpt3"), [], ["'gpt3'", "`gpt2`"]),
        (lambda j: j["model"]["config"].update(n_layers=2), [], ["`n_layers`", "`n_layer`"]),
        (lambda j: j["model"].update(confg={}), [], ["model", "`confg`", "`config`"]),
        (lambda j: j.update(data={"shakespear": {}}), [], ["`shakespear`", "`shakespeare`"]),
        (lambda j: j["data"]["shakespeare"].update(eval_plays=["hamlett"]), [], ["'hamlett'", "`hamlet`"]),
        (lambda j: j["data"]["shakespeare"].update(max_char=1), [], ["`max_char`", "`max_chars`"]),
        (lambda j: j["tokenizer"].update(vocab=300), [], ["tokenizer", "`vocab`"]),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, flags: list[str], expected: list[str]
) -> None:
    job = tiny_job(tmp_path)
    change(job)
    assert main(["train", write_job(tmp_path, job), *flags]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "run").exists()  # nothing trained


def test_generic_from_config_model_takes_vocab_and_special_ids_from_the_tokenizer(tmp_path: Path) -> None:
    splits = build_texts({"shakespeare": {"max_chars": 3000, "eval_max_chars": 500}})
    tokenizer = build_tokenizer({"train": "byte_level_bpe", "vocab_size": 280}, {}, splits.train)
    spec = {
        "from_config": "transformers.GPT2Config",
        "class": "transformers.GPT2LMHeadModel",
        "config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16},
    }
    model = build_model(spec, tokenizer)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.vocab_size == len(tokenizer) == 280
    assert model.config.eos_token_id == model.config.pad_token_id == tokenizer.eos_token_id


def test_pretrained_model_and_tokenizer_load_from_a_run(trained: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = trained
    tokenizer = build_tokenizer(None, {"pretrained": str(run)}, [])
    model = build_model({"pretrained": str(run)}, tokenizer)
    assert model.config.n_layer == 1 and len(tokenizer) == 300


def test_import_is_light() -> None:
    code = "import sys, ember.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_job_prints_no_transformers_warning_and_no_save_bar(tmp_path: Path) -> None:
    """The demo path in a fresh process (transformers warns once per process): GPT-2's loss is named,
    and saving draws no "Writing model shards" bar for ember's own saves."""
    config = write_job(tmp_path, tiny_job(tmp_path, max_steps=2, eval_strategy="no"))
    run = subprocess.run(
        [sys.executable, "-m", "ember.cli", "train", config],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "[transformers]" not in run.stderr
    assert "loss_type" not in run.stderr
    assert "Writing model shards" not in run.stderr
