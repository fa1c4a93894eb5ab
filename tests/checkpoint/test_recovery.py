"""Resume after the run folder moved, from a run folder, and from checkpoints whose files were
damaged or crafted: each one either works or stops with an error naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from ember import Trainer, TrainerCallback, TrainingArguments
from ember.checkpoint import CheckpointError, load_state, verify_checkpoint
from ember.checkpoint.files import MAX_JSON_DEPTH, read_json, relocate_in_run
from tests.helpers import RegressionDataset, RegressionModel
from tests.resume_job import final_state, make_trainer


class Crash(Exception):
    pass


class CrashAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            raise Crash(self.step)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trainer(out: Path, **kw: object) -> Trainer:
    return make_trainer(str(out), dataloader_num_workers=0, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    trainer = _trainer(tmp_path_factory.mktemp("ref"))
    trainer.train()
    return final_state(trainer)


def _crashed_run(out: Path, step: int = 6) -> Path:
    first = _trainer(out)
    first.add_callback(CrashAfterSave(step))
    with pytest.raises(Crash):
        first.train()
    return out


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Change a file and its manifest entry consistently, as a crafted checkpoint would."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


# -- 3. a moved run folder -----------------------------------------------------------------------


class Score:
    """Best at the first evaluation (step 2), worse after; `done` evaluations happened before."""

    def __init__(self, done: int = 0) -> None:
        self.calls = done

    def __call__(self, pred):  # type: ignore[no-untyped-def]
        self.calls += 1
        return {"score": 10.0 if self.calls == 1 else float(self.calls)}


def _best_trainer(out: Path, done: int = 0) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=10,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=1,
        metric_for_best_model="score",
        greater_is_better=True,
        load_best_model_at_end=True,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        per_device_train_batch_size=8,
    )
    return Trainer(
        RegressionModel(),
        args,
        train_dataset=RegressionDataset(),
        eval_dataset=RegressionDataset(8),
        compute_metrics=Score(done),
    )


def test_resume_after_moving_the_run_folder_keeps_and_loads_the_best(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    first = _best_trainer(old)
    first.add_callback(CrashAfterSave(6))
    with pytest.raises(Crash):
        first.train()
    assert json.loads((old / "checkpoint-6" / "trainer_state.json").read_text())[
        "best_model_checkpoint"
    ] == str(old / "checkpoint-2")
    shutil.move(old, new)
    best_weights = load_file(str(new / "checkpoint-2" / "model.safetensors"))

    resumed = _best_trainer(new, done=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.best_model_checkpoint == str(new / "checkpoint-2")
    # save_total_limit=1 with a best model ends, as in transformers, with the best checkpoint alone.
    assert sorted(p.name for p in new.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not old.exists()
    now = resumed.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in best_weights.items())  # the best was reloaded


def test_best_checkpoint_path_is_resolved_inside_the_run_folder(tmp_path: Path, caplog) -> None:
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    run, source = tmp_path / "run", tmp_path / "trainer_state.json"
    assert relocate_in_run(str(run / "checkpoint-2"), run, source) == str(run / "checkpoint-2")
    assert relocate_in_run("/gone/run/checkpoint-2", run, source) == str(run / "checkpoint-2")
    (tmp_path / "elsewhere" / "checkpoint-2").mkdir(parents=True)  # exists, but not in this run
    assert relocate_in_run(str(tmp_path / "elsewhere" / "checkpoint-2"), run, source) == str(
        run / "checkpoint-2"
    )
    with caplog.at_level("WARNING"):
        assert relocate_in_run("/gone/run/checkpoint-8", run, source) is None
    assert "checkpoint-8" in caplog.text and "is not in output_dir" in caplog.text
    for bad in ("/etc", "../../etc/passwd", 3):
        with pytest.raises(CheckpointError, match="trainer_state.json: best_model_checkpoint"):
            relocate_in_run(bad, run, source)


# -- 4. the run folder as resume_from_checkpoint --------------------------------------------------


def test_resume_from_the_run_folder_picks_its_newest_complete_checkpoint(tmp_path: Path, reference) -> None:
    out = _crashed_run(tmp_path / "run", step=4)
    resumed = _trainer(out)
    resumed.train(resume_from_checkpoint=str(out))
    assert _same(final_state(resumed), reference)
    with pytest.raises(CheckpointError, match="run folder, and none of its checkpoints is complete"):
        for path in out.glob("checkpoint-*/manifest.json"):
            path.unlink()
        _trainer(out).train(resume_from_checkpoint=str(out))


# -- 5. untrusted files --------------------------------------------------------------------------


def test_state_file_naming_a_tensor_file_outside_is_refused(tmp_path: Path, reference) -> None:
    out = _crashed_run(tmp_path / "run")
    loot = tmp_path / "elsewhere" / "loot.safetensors"
    loot.parent.mkdir()
    shutil.copy(out / "checkpoint-6" / "trainer.safetensors", loot)
    doc = json.loads((out / "checkpoint-6" / "trainer.json").read_text())
    doc["tensors"] = "../../elsewhere/loot.safetensors"
    _rewrite(out / "checkpoint-6", "trainer.json", json.dumps(doc).encode())
    assert verify_checkpoint(out / "checkpoint-6") is None  # the manifest was forged to match
    with pytest.raises(CheckpointError, match=r"trainer\.json: \"tensors\" = '\.\./\.\./elsewhere"):
        load_state(out / "checkpoint-6", "trainer")
    with pytest.raises(CheckpointError, match=r"checkpoint-6/trainer\.json: \"tensors\""):
        _trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-6"))


def test_weights_index_pointing_outside_is_refused(tmp_path: Path) -> None:
    out = _crashed_run(tmp_path / "run")
    folder = out / "checkpoint-6"
    index = {"metadata": {}, "weight_map": {"hidden.weight": "../../loot.safetensors"}}
    _rewrite(folder, "model.safetensors.index.json", json.dumps(index).encode())
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json: weight_map\['hidden\.weight'\]"
    ):
        _trainer(out).train(resume_from_checkpoint=str(folder))


def test_deeply_nested_json_is_an_error_naming_it_and_true_falls_back(
    tmp_path: Path, reference, caplog
) -> None:
    out = _crashed_run(tmp_path / "run")
    state = (out / "checkpoint-6" / "trainer_state.json").read_text()
    nested = state.replace('"log_history": [', '"log_history": [' + "[" * 100_000 + "]" * 100_000 + ",", 1)
    _rewrite(out / "checkpoint-6", "trainer_state.json", nested.encode())
    with pytest.raises(CheckpointError, match=r"checkpoint-6/trainer_state\.json is nested more than 64"):
        _trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-6"))
    resumed = _trainer(out)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "Skipping checkpoint" in caplog.text and "trainer_state.json is nested" in caplog.text
    assert _same(final_state(resumed), reference)  # from checkpoint-4, exactly


def test_deeply_nested_manifest_makes_the_checkpoint_incomplete(tmp_path: Path) -> None:
    out = _crashed_run(tmp_path / "run", step=4)
    (out / "checkpoint-4" / "manifest.json").write_text("[" * 50_000 + "]" * 50_000)
    assert "manifest.json is nested more than 64" in (verify_checkpoint(out / "checkpoint-4") or "")


def test_json_reader_bounds(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert read_json(path) is not None  # exactly at the limit is fine
    path.write_text("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(CheckpointError, match="x.json is nested more than 64"):
        read_json(path)
    path.write_text(json.dumps({"a": "b" * 2000}))
    with pytest.raises(CheckpointError, match="x.json is larger than"):
        read_json(path, max_bytes=1024)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CheckpointError, match="x.json is not valid JSON"):
        read_json(path)


def test_same_size_corruption(tmp_path: Path, reference, caplog) -> None:
    out = _crashed_run(tmp_path / "run")
    folder = out / "checkpoint-6"
    # Bad JSON of the same length passes the size check; the hash, or without it the JSON reader,
    # finds it, and the error names the file.
    text = (folder / "trainer.json").read_text()
    (folder / "trainer.json").write_text("#" + text[1:])
    assert verify_checkpoint(folder, deep=False) is None
    with pytest.raises(CheckpointError, match=r"trainer\.json: xxh3_128 hash mismatch"):
        _trainer(out).train(resume_from_checkpoint=str(folder))
    with pytest.raises(CheckpointError, match=r"checkpoint-6/trainer\.json is not valid JSON"):
        _trainer(out, verify_checkpoints=False).train(resume_from_checkpoint=str(folder))
    (folder / "trainer.json").write_text(text)
    # A flipped byte in the weights: only the hash check sees it, and resume checks it by default.
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match="model.safetensors: xxh3_128 hash mismatch"):
        _trainer(out).train(resume_from_checkpoint=str(folder))
    resumed = _trainer(out)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "Skipping checkpoint" in caplog.text and "xxh3_128 hash mismatch" in caplog.text
    assert _same(final_state(resumed), reference)
    # verify_checkpoints=False skips the hashes (sizes only): the changed file is loaded as it is.
    unchecked = _trainer(out, verify_checkpoints=False)
    unchecked.train(resume_from_checkpoint=str(folder))
    assert unchecked.state.global_step == resumed.state.global_step


def test_a_manifest_of_an_older_ember_is_checked_with_its_sha256(tmp_path: Path, reference) -> None:
    out = _crashed_run(tmp_path / "run")
    folder = out / "checkpoint-6"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == 2
    old = {
        name: {"size": info["size"], "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
        for name, info in manifest["files"].items()
    }
    (folder / "manifest.json").write_text(json.dumps({**manifest, "version": 1, "files": old}))
    assert verify_checkpoint(folder) is None
    resumed = _trainer(out)
    resumed.train(resume_from_checkpoint=str(folder))
    assert _same(final_state(resumed), reference)
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[0] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(weights))
    assert verify_checkpoint(folder, deep=False) is None
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 hash mismatch"):
        _trainer(out).train(resume_from_checkpoint=str(folder))


def test_a_manifest_of_a_newer_ember_is_refused(tmp_path: Path) -> None:
    out = _crashed_run(tmp_path / "run")
    folder = out / "checkpoint-6"
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(CheckpointError, match="manifest.json has version 99; this ember reads up to 2"):
        _trainer(out).train(resume_from_checkpoint=str(folder))


def test_manifest_hashes_are_taken_while_writing(tmp_path: Path, monkeypatch) -> None:
    from ember.checkpoint import atomic

    reread: list[str] = []
    original = atomic.hash_file

    def spy(path: Path, name: str = "xxh3_128") -> str:
        reread.append(path.name)
        return original(path, name)

    monkeypatch.setattr(atomic, "hash_file", spy)
    _trainer(tmp_path, max_steps=2).train()
    assert reread == []  # a plain module: every file of the checkpoint went through the hashing writer
    folder = tmp_path / "checkpoint-2"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert len(manifest) >= 8
    for name, info in manifest.items():
        assert xxhash.xxh3_128((folder / name).read_bytes()).hexdigest() == info["xxh3_128"], name
