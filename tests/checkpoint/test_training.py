"""Trainer checkpoints end to end: layout, exact resume, rotation, failures, kills, preemption."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from ember.checkpoint import CheckpointError, CheckpointWriteError
from tests.helpers import RegressionDataset, RegressionModel, lm_examples, pad_lm_batch, tiny_gpt2
from tests.pickle_check import assert_no_pickle
from tests.resume_job import AugmentedData, final_state, job_args, make_trainer

REPO = Path(__file__).resolve().parents[2]


class Crash(Exception):
    pass


class CrashAfterSave(TrainerCallback):
    """Simulates a process dying right after checkpoint `step` is on disk."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(self.step)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def _interrupted(tmp_path: Path, stop_at: int, **overrides) -> Trainer:
    first = make_trainer(str(tmp_path), **overrides)
    first.add_callback(CrashAfterSave(stop_at))
    with pytest.raises(Crash):
        first.train()
    resumed = make_trainer(str(tmp_path), **overrides)
    resumed.train(resume_from_checkpoint=True)
    return resumed


@pytest.mark.parametrize(
    ("stop_at", "overrides"),
    [
        (4, {}),  # mid-epoch (6 steps an epoch), GA=2, two workers, dropout, augmentation
        (6, {}),  # exactly at the epoch boundary
        (2, {"dataloader_num_workers": 0, "gradient_accumulation_steps": 1, "save_steps": 1}),
    ],
)
def test_resume_equals_uninterrupted(tmp_path, stop_at, overrides):
    reference = make_trainer(str(tmp_path / "ref"), **overrides)
    ref_out = reference.train()
    resumed = _interrupted(tmp_path / "run", stop_at, **overrides)
    _assert_same(final_state(reference), final_state(resumed))
    assert resumed.state.global_step == reference.state.global_step
    losses = [h["train_loss"] for h in resumed.state.log_history if "train_loss" in h]
    assert losses[-1] == ref_out.training_loss
    # The logged losses of the steps both runs share agree too.
    ref_logs = [h for h in reference.state.log_history if "loss" in h]
    new_logs = [h for h in resumed.state.log_history if "loss" in h]
    assert [h["loss"] for h in ref_logs] == [h["loss"] for h in new_logs]


class ReplayingResumeTrainer(Trainer):
    """A subclass written for transformers 5.25's hook: it skips by reading batches and counts calls."""

    calls: list[int] = []

    def get_resumed_dataloader(self, dataloader, num_batches):
        type(self).calls.append(num_batches)

        def replay():
            for i, batch in enumerate(dataloader):
                if i >= num_batches:
                    yield batch

        return replay()


def test_get_resumed_dataloader_override_is_honoured_on_a_mid_epoch_resume(tmp_path):
    reference = make_trainer(str(tmp_path / "ref"))
    reference.train()
    first = make_trainer(str(tmp_path / "run"))
    first.add_callback(CrashAfterSave(4))
    with pytest.raises(Crash):
        first.train()
    ReplayingResumeTrainer.calls = []
    resumed = make_trainer(str(tmp_path / "run"))
    resumed.__class__ = ReplayingResumeTrainer
    resumed.train(resume_from_checkpoint=True)
    # Step 4 of 6 in the first epoch, GA=2: 8 micro-batches to skip, asked once (the resumed epoch only).
    assert ReplayingResumeTrainer.calls == [8]
    # Replaying the batches gives the same data (each batch's randomness is keyed by its index).
    _assert_same(final_state(reference), final_state(resumed))


def test_default_resume_skips_without_loading_a_batch(tmp_path, monkeypatch):
    first = make_trainer(str(tmp_path / "run"), dataloader_num_workers=0)
    first.add_callback(CrashAfterSave(4))
    with pytest.raises(Crash):
        first.train()
    reads: list[int] = []
    original = AugmentedData.__getitem__
    monkeypatch.setattr(AugmentedData, "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    make_trainer(str(tmp_path / "fresh"), dataloader_num_workers=0, max_steps=1).train()
    one_step = len(reads)  # the examples of one step, and the checks' first-item peeks
    reads.clear()
    resumed = make_trainer(str(tmp_path / "run"), dataloader_num_workers=0, max_steps=5)
    resumed.train(resume_from_checkpoint=True)
    # One step was trained after the resume, and none of the 8 skipped micro-batches was read.
    assert resumed.state.global_step == 5
    assert len(reads) == one_step


class StreamedRegression(torch.utils.data.IterableDataset):
    def __iter__(self):
        data = RegressionDataset(40, seed=1)
        return (data[i] for i in range(len(data)))


def test_iterable_dataset_resumes_mid_epoch_after_the_trained_batches(tmp_path):
    def run(out: Path, crash_at: int | None = None) -> Trainer:
        args = job_args(str(out), max_steps=8, dataloader_num_workers=0, save_steps=2)
        trainer = Trainer(model_init=lambda: RegressionModel(), args=args, train_dataset=StreamedRegression())
        if crash_at:
            trainer.add_callback(CrashAfterSave(crash_at))
        return trainer

    reference = run(tmp_path / "ref")
    reference.train()
    with pytest.raises(Crash):
        run(tmp_path / "run", crash_at=2).train()
    resumed = run(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    _assert_same(final_state(reference), final_state(resumed))


class Worsening:
    """A metric that improves twice, then only gets worse: early stopping must fire mid-run."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pred):
        self.calls += 1
        return {"score": float(self.calls) if self.calls <= 2 else 2.0 - self.calls}


def _early_stopping_trainer(out: Path, restore: bool) -> Trainer:
    args = job_args(
        str(out),
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="score",
        greater_is_better=True,
        load_best_model_at_end=True,
        dataloader_num_workers=0,
        restore_callback_states_from_checkpoint=restore,
    )
    metric = Worsening()
    trainer = Trainer(
        model_init=lambda: RegressionModel(dropout=0.2),
        args=args,
        train_dataset=AugmentedData(),
        eval_dataset=RegressionDataset(12, seed=3),
        compute_metrics=metric,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=3)],
    )
    trainer.metric = metric  # type: ignore[attr-defined]
    return trainer


def test_resume_with_eval_and_early_stopping_state(tmp_path):
    reference = _early_stopping_trainer(tmp_path / "ref", restore=True)
    reference.train()
    # Best at step 4; patience 3 runs out at step 10, well before the 18 steps of 3 epochs.
    assert reference.state.global_step == 10
    first = _early_stopping_trainer(tmp_path / "run", restore=True)
    first.add_callback(CrashAfterSave(8))  # patience counter is 2 here
    with pytest.raises(Crash):
        first.train()
    resumed = _early_stopping_trainer(tmp_path / "run", restore=True)
    resumed.metric.calls = 4  # the metric object is the user's; it lives outside the checkpoint
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 10
    _assert_same(final_state(reference), final_state(resumed))
    assert resumed.state.best_metric == reference.state.best_metric == 2.0
    assert Path(resumed.state.best_model_checkpoint).name == "checkpoint-4"


def test_callback_states_stay_fresh_without_restore_flag_and_it_says_so(tmp_path, caplog):
    first = _early_stopping_trainer(tmp_path, restore=False)
    first.add_callback(CrashAfterSave(8))
    with pytest.raises(Crash):
        first.train()
    resumed = _early_stopping_trainer(tmp_path, restore=False)
    resumed.metric.calls = 4
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "restore_callback_states_from_checkpoint" in caplog.text
    # transformers' default: the patience counter restarts, so stopping comes later than step 10.
    assert resumed.state.global_step > 10


def test_changed_batch_size_on_resume_warns_with_the_numbers(tmp_path, caplog):
    first = make_trainer(str(tmp_path), dataloader_num_workers=0)
    first.add_callback(CrashAfterSave(4))
    with pytest.raises(Crash):
        first.train()
    with caplog.at_level("WARNING"):
        make_trainer(str(tmp_path), dataloader_num_workers=0, gradient_accumulation_steps=1).train(
            resume_from_checkpoint=True
        )
    assert "gradient_accumulation_steps 2 -> 1" in caplog.text


def test_ignore_data_skip_restarts_the_epoch_data(tmp_path):
    first = make_trainer(str(tmp_path), dataloader_num_workers=0)
    first.add_callback(CrashAfterSave(4))
    with pytest.raises(Crash):
        first.train()
    resumed = make_trainer(str(tmp_path), dataloader_num_workers=0, ignore_data_skip=True)
    resumed.train(resume_from_checkpoint=True)
    # transformers' meaning: epoch 0's data starts over (6 steps) while max_steps stays 18, so the
    # run ends 4 steps short of the end of epoch 2.
    assert resumed.state.global_step == 18
    assert resumed.state.epoch == pytest.approx(2 + 2 / 6)


def test_layout_state_fields_and_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        logging_steps=1,
    )
    trainer = Trainer(tiny_gpt2(0), args, train_dataset=lm_examples(16), data_collator=pad_lm_batch)
    trainer.train()
    ckpt = tmp_path / "checkpoint-4"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "trainer_state.json",
        "training_args.json",
        "manifest.json",
        "optimizer.safetensors",
        "optimizer.json",
        "trainer.json",
        "rank-0.json",
    } <= names
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for field in (
        "global_step",
        "epoch",
        "max_steps",
        "log_history",
        "best_metric",
        "best_global_step",
        "best_model_checkpoint",
        "stateful_callbacks",
        "logging_steps",
        "save_steps",
        "train_batch_size",
        "num_train_epochs",
        "total_flos",
    ):
        assert field in state
    assert state["global_step"] == 4 and state["max_steps"] == 4
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt))
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert_no_pickle(tmp_path)


def test_rotation_keeps_newest_and_best(tmp_path):
    class Metric:
        """eval_loss is best at step 2, then worse: checkpoint-2 must survive rotation."""

        def __init__(self):
            self.calls = 0

        def __call__(self, pred):
            self.calls += 1
            return {"score": 10.0 if self.calls == 1 else float(self.calls)}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=10,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=2,
        metric_for_best_model="score",
        greater_is_better=True,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        per_device_train_batch_size=8,
    )
    trainer = Trainer(
        RegressionModel(),
        args,
        train_dataset=RegressionDataset(),
        eval_dataset=RegressionDataset(8),
        compute_metrics=Metric(),
    )
    trainer.train()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    # As transformers: save_total_limit counts the best and the newest, so exactly these two stay.
    assert left == ["checkpoint-10", "checkpoint-2"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")


def test_truncated_newest_checkpoint_is_skipped(tmp_path, caplog):
    reference = make_trainer(str(tmp_path / "ref"), dataloader_num_workers=0)
    reference.train()
    first = make_trainer(str(tmp_path / "run"), dataloader_num_workers=0)
    first.add_callback(CrashAfterSave(6))
    with pytest.raises(Crash):
        first.train()
    weights = tmp_path / "run" / "checkpoint-6" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    # Named explicitly, a damaged checkpoint is an error, not a silent fallback.
    with pytest.raises(CheckpointError, match="checkpoint-6"):
        make_trainer(str(tmp_path / "run"), dataloader_num_workers=0).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6")
        )
    resumed = make_trainer(str(tmp_path / "run"), dataloader_num_workers=0)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "checkpoint-6" in caplog.text
    _assert_same(final_state(reference), final_state(resumed))  # it resumed from checkpoint-4 instead


def test_disk_full_keeps_earlier_checkpoints_and_says_so(tmp_path, monkeypatch):
    from ember.checkpoint import training

    original = training.write_snapshot

    def failing(snap, folder):
        if "checkpoint-4" in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.safetensors"))
        original(snap, folder)

    monkeypatch.setattr(training, "write_snapshot", failing)
    trainer = make_trainer(str(tmp_path), dataloader_num_workers=0)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*checkpoint-2"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "logs.jsonl"]
    from ember.checkpoint import verify_checkpoint

    assert verify_checkpoint(tmp_path / "checkpoint-2") is None


def test_save_only_model_checkpoint_cannot_resume_and_says_why(tmp_path):
    trainer = make_trainer(str(tmp_path), dataloader_num_workers=0, save_only_model=True, max_steps=2)
    trainer.train()
    with pytest.raises(ValueError, match="save_only_model"):
        make_trainer(str(tmp_path), dataloader_num_workers=0, max_steps=4).train(resume_from_checkpoint=True)


def test_async_save_gives_the_same_checkpoint(tmp_path):
    sync = make_trainer(str(tmp_path / "sync"), dataloader_num_workers=0)
    sync.train()
    asyn = make_trainer(str(tmp_path / "async"), dataloader_num_workers=0, save_async=True)
    asyn.train()
    for step in (2, 6, 18):
        for name in ("model.safetensors", "optimizer.safetensors", "rank-0.safetensors"):
            a = load_file(str(tmp_path / "sync" / f"checkpoint-{step}" / name))
            b = load_file(str(tmp_path / "async" / f"checkpoint-{step}" / name))
            _assert_same(a, b)


def test_resume_never_unpickles(tmp_path, monkeypatch):
    first = make_trainer(str(tmp_path), dataloader_num_workers=0)
    first.add_callback(CrashAfterSave(4))
    with pytest.raises(Crash):
        first.train()

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load called during resume")

    monkeypatch.setattr(torch, "load", no_load)
    import pickle

    monkeypatch.setattr(pickle, "load", no_load)
    monkeypatch.setattr(pickle, "loads", no_load)
    make_trainer(str(tmp_path), dataloader_num_workers=0).train(resume_from_checkpoint=True)
    assert_no_pickle(tmp_path)
    source = "\n".join(p.read_text() for p in (REPO / "ember").rglob("*.py"))
    assert "torch.load(" not in source and "pickle.load" not in source


def _run_job(out: Path, result: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.resume_job", str(out), str(result), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_for_training(proc: subprocess.Popen, out: Path, timeout: float = 120.0) -> None:
    """Block until the job has logged a step (so it is past start-up and inside the loop)."""
    deadline = time.monotonic() + timeout
    while not (out / "logs.jsonl").exists():
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.05)


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path):
    ref_result = tmp_path / "ref.safetensors"
    reference = _run_job(tmp_path / "ref", ref_result)
    rng = random.Random(1234)
    result = tmp_path / "run.safetensors"
    kills = 0
    # Slow saves and steps widen the windows, so kills land both in steps and in saves.
    extra = ("--slow-save", "0.15", "--step-sleep", "0.05")
    for _ in range(8):
        proc = _run_job(tmp_path / "run", result, *extra)
        _wait_for_training(proc, tmp_path / "run")
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = _run_job(tmp_path / "run", result, *extra)
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode() if proc.stdout else ""
    assert reference.wait(timeout=300) == 0
    assert kills >= 2
    _assert_same(load_file(str(ref_result)), load_file(str(result)))


def test_sigterm_checkpoints_exits_and_resumes_exactly(tmp_path):
    ref_result = tmp_path / "ref.safetensors"
    reference = _run_job(tmp_path / "ref", ref_result)
    result = tmp_path / "run.safetensors"
    proc = _run_job(tmp_path / "run", result, "--step-sleep", "0.1")
    _wait_for_training(proc, tmp_path / "run")
    time.sleep(0.3)
    assert proc.poll() is None, "the job finished before it could be preempted; slow it down"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "preempted at step" in output
    step = int(output.split("preempted at step ")[1].split(";")[0])
    assert (tmp_path / "run" / f"checkpoint-{step}").is_dir()
    proc = _run_job(tmp_path / "run", result)
    assert proc.wait(timeout=300) == 0
    assert reference.wait(timeout=300) == 0
    _assert_same(load_file(str(ref_result)), load_file(str(result)))
