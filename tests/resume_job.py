"""A small training job run in a subprocess by the kill/preemption tests.

usage: python -m tests.resume_job OUTPUT_DIR RESULT_FILE [--slow-save SECONDS] [--step-sleep SECONDS]
       [--pause-at STEP --release FILE] [--save-async] [--save-total-limit N]
       [--epochs N] [--ready FILE] [--slow-rotate SECONDS]

Trains a dropout model on augmented data (random numbers drawn in __getitem__, two dataloader
workers, GA=2), saving every 2 steps, always with resume_from_checkpoint=True when a checkpoint
exists. On completion writes the final parameters and optimizer state to RESULT_FILE.
With --pause-at, the job writes `FILE.paused` after step STEP and waits until FILE exists.
With --ready, it writes FILE (holding the step it starts from) once training begins.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember import Trainer, TrainerCallback, TrainingArguments, get_last_checkpoint
from tests.helpers import RegressionModel


class AugmentedData(torch.utils.data.Dataset):
    """Each read adds fresh noise: the noise must be the same after a resume for bit-exactness."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i] + 0.05 * torch.randn(())
        return {"input_x": x, "labels": 2.0 * x + 1.0}


class Sleep(TrainerCallback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)


class Pause(TrainerCallback):
    """Hold the run after one step until the test says go: a deterministic window for it to act."""

    def __init__(self, step: int, release: str) -> None:
        self.step, self.release = step, Path(release)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step != self.step:
            return
        Path(f"{self.release}.paused").write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not self.release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class Ready(TrainerCallback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # Renamed into place, so a reader never sees it empty.
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text(str(state.global_step))
        os.replace(tmp, self.path)


def job_args(output_dir: str, **overrides: object) -> TrainingArguments:
    kw: dict[str, object] = dict(
        output_dir=output_dir,
        num_train_epochs=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.01,
        save_steps=2,
        logging_steps=3,
        dataloader_num_workers=2,
        report_to="jsonl",  # the test waits for logs.jsonl to know training has started
        disable_tqdm=True,
        use_cpu=True,
        seed=7,
        optim="adamw_torch",
    )
    kw.update(overrides)
    return TrainingArguments(**kw)  # type: ignore[arg-type]


def make_trainer(output_dir: str, step_sleep: float = 0.0, **overrides: object) -> Trainer:
    callbacks = [Sleep(step_sleep)] if step_sleep else []
    return Trainer(
        model_init=lambda: RegressionModel(dropout=0.2),
        args=job_args(output_dir, **overrides),
        train_dataset=AugmentedData(),
        callbacks=callbacks,
    )


def final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"param.{k}": v.detach().clone() for k, v in trainer.model.named_parameters()}
    for pid, st in trainer.optimizer.state_dict()["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{pid}.{name}"] = value.detach().clone()
    return out


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("result")
    parser.add_argument("--slow-save", type=float, default=0.0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--pause-at", type=int, default=0)
    parser.add_argument("--release", default="")
    parser.add_argument("--save-async", action="store_true")
    parser.add_argument("--save-total-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ready", default="")
    parser.add_argument("--slow-rotate", type=float, default=0.0)
    opts = parser.parse_args()
    if opts.slow_save:
        # Widen the window in which a kill lands mid-save (the test's own slowdown, not ember's).
        from ember.checkpoint import training

        original = training.write_snapshot

        def slow(snap, folder):  # type: ignore[no-untyped-def]
            original(snap, folder)
            time.sleep(opts.slow_save)

        training.write_snapshot = slow
    if opts.slow_rotate:
        # Widen the window between renaming a rotated checkpoint away and removing it.
        from ember.checkpoint import rotation

        fsync_dir = rotation.fsync_dir

        def slow_fsync(path):  # type: ignore[no-untyped-def]
            fsync_dir(path)
            time.sleep(opts.slow_rotate)

        rotation.fsync_dir = slow_fsync
    trainer = make_trainer(
        opts.output_dir,
        step_sleep=opts.step_sleep,
        save_async=opts.save_async,
        save_total_limit=opts.save_total_limit,
        num_train_epochs=opts.epochs,
    )
    if opts.ready:
        trainer.add_callback(Ready(opts.ready))
    if opts.pause_at:
        trainer.add_callback(Pause(opts.pause_at, opts.release))
    resume = get_last_checkpoint(opts.output_dir) is not None
    out = trainer.train(resume_from_checkpoint=True if resume else None)
    state = final_state(trainer)
    state["train_loss"] = torch.tensor(out.training_loss, dtype=torch.float64)
    save_file(state, opts.result)


if __name__ == "__main__":
    main()
