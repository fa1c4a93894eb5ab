"""auto_resume: a relaunched job continues from the newest complete checkpoint of its output_dir
(or starts fresh when there is none) without the script changing; values given to train() keep
transformers' meaning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ember import Trainer, TrainerCallback
from ember.checkpoint.files import CheckpointError
from tests.resume_job import final_state, make_trainer


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            raise Crash(self.step)


def _trainer(out: Path, **kw: object) -> Trainer:
    return make_trainer(str(out), dataloader_num_workers=0, report_to="none", **kw)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    trainer = _trainer(tmp_path_factory.mktemp("ref"))
    trainer.train()
    return final_state(trainer)


def _crashed(out: Path, step: int = 7, **kw: object) -> None:
    """A run killed by an error at step 7: checkpoint-6 is its newest complete checkpoint."""
    first = _trainer(out, **kw)
    first.add_callback(CrashAt(step))
    with pytest.raises(Crash):
        first.train()


@pytest.fixture(autouse=True)
def _no_launcher_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT", "EMBER_AUTO_RESUME"):
        monkeypatch.delenv(name, raising=False)


def test_auto_resume_continues_from_the_newest_complete_checkpoint_bit_exactly(tmp_path, reference, caplog):
    _crashed(tmp_path, auto_resume=True)
    (tmp_path / "checkpoint-8.tmp").mkdir()  # an interrupted save: never chosen
    again = _trainer(tmp_path, auto_resume=True)
    with caplog.at_level(logging.WARNING, logger="ember"):
        again.train()  # the same script line as the first run: no resume_from_checkpoint
    assert _same(final_state(again), reference)
    newest = tmp_path / "checkpoint-6"
    assert f"auto_resume (auto_resume=True): resuming from {newest} (step 6)" in caplog.text


def test_auto_resume_starts_fresh_when_there_is_no_checkpoint_and_says_so(tmp_path, reference, caplog):
    trainer = _trainer(tmp_path, auto_resume=True)
    with caplog.at_level(logging.WARNING, logger="ember"):
        trainer.train()
    assert _same(final_state(trainer), reference)
    assert "no complete checkpoint in" in caplog.text and "starting fresh" in caplog.text


@pytest.mark.parametrize(
    ("variable", "value"),
    [("TORCHELASTIC_RESTART_COUNT", "1"), ("SLURM_RESTART_COUNT", "2"), ("EMBER_AUTO_RESUME", "1")],
)
def test_unset_it_resumes_only_a_relaunched_job(tmp_path, reference, monkeypatch, caplog, variable, value):
    _crashed(tmp_path)
    monkeypatch.setenv(variable, value)
    again = _trainer(tmp_path)  # auto_resume unset
    with caplog.at_level(logging.WARNING, logger="ember"):
        again.train()
    assert _same(final_state(again), reference)
    assert f"auto_resume ({variable}={value}): resuming from" in caplog.text


class StartStep(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.step = state.global_step


@pytest.mark.parametrize(
    ("auto", "restart", "given"),
    [(None, "0", None), (False, "3", None), (True, "3", False)],
    ids=["first-launch", "auto_resume-False", "train-given-False"],
)
def test_it_starts_fresh_on_a_first_launch_when_off_or_when_train_says_false(
    tmp_path, monkeypatch, auto, restart, given
):
    _crashed(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
    again = _trainer(tmp_path, auto_resume=auto)
    start = StartStep()
    again.add_callback(start)
    again.train(resume_from_checkpoint=given)
    assert start.step == 0


def test_resume_from_checkpoint_true_keeps_its_meaning_an_error_without_a_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, auto_resume=True)
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_a_path_given_to_train_wins_over_auto_resume(tmp_path):
    _crashed(tmp_path)
    again = _trainer(tmp_path, auto_resume=True)
    start = StartStep()
    again.add_callback(start)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert start.step == 4


class SeesCheckpoint(TrainerCallback):
    """Records, when training starts, the resumed step and whether a folder is still there as it was."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.before = folder, sorted(p.name for p in folder.iterdir())

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.step = state.global_step
        self.untouched = sorted(p.name for p in self.folder.iterdir()) == self.before


def _flip_a_byte(path: Path) -> None:
    """A same-size change: only the hash can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped-byte", "missing-file"])
def test_auto_resume_skips_a_newest_checkpoint_that_fails_verification(tmp_path, reference, caplog, damage):
    _crashed(tmp_path, auto_resume=True)
    newest = tmp_path / "checkpoint-6"
    if damage == "flipped-byte":
        _flip_a_byte(newest / "model.safetensors")
        why = "model.safetensors: xxh3_128 hash mismatch"
    else:
        (newest / "optimizer.safetensors").unlink()
        why = "optimizer.safetensors: missing file"
    again = _trainer(tmp_path, auto_resume=True)
    seen = SeesCheckpoint(newest)
    again.add_callback(seen)
    with caplog.at_level(logging.WARNING, logger="ember"):
        again.train()
    assert seen.step == 4 and seen.untouched  # the one before it; the damaged one left in place
    assert _same(final_state(again), reference)  # and still bit-exact
    assert f"resuming from {tmp_path / 'checkpoint-4'} (step 4); skipped checkpoint-6 ({why}" in caplog.text


def test_a_damaged_checkpoint_named_explicitly_is_still_refused_naming_the_file(tmp_path):
    _crashed(tmp_path, auto_resume=True)
    _flip_a_byte(tmp_path / "checkpoint-6" / "model.safetensors")
    again = _trainer(tmp_path, auto_resume=True)
    with pytest.raises(CheckpointError, match=r"checkpoint-6: model\.safetensors: xxh3_128 hash mismatch"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_auto_resume_hashes_its_pick_once(tmp_path, monkeypatch):
    from ember.checkpoint import atomic

    _crashed(tmp_path, auto_resume=True)
    hashed: list[str] = []
    real = atomic.hash_file
    monkeypatch.setattr(atomic, "hash_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    again = _trainer(tmp_path, auto_resume=True)
    again.add_callback(stop := StopAtStart())
    again.train()
    assert stop.step == 6
    assert hashed.count("model.safetensors") == 1


class StopAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.step = state.global_step
        control.should_training_stop = True
