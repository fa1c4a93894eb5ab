"""Checkpoint benchmark (issue 3): resume cost against data position, and what a save blocks.

    python -m bench.checkpoint                 # full run, writes bench/results/checkpoint.{md,json}
    python -m bench.checkpoint --smoke --out DIR   # tiny sizes, one round, < 30 s (CI)

1. Resume: a 2,000,000-sample map-style epoch, batch 8, a one-float affine model. One run trains
   genuinely to step 10,000 (4-8 ms/step on a shared 2-core machine, so 40-80 s: cheap enough that
   no state needs forging), saving at step 10 and 10,000. Each timed resume builds a fresh Trainer
   and measures `train(resume_from_checkpoint=...)` until the first resumed optimizer step ends
   (wall and CPU time), and the restore part of it (`Trainer._resume`).
   For contrast, the cost of finding the position by replay: iterating 10,000 batches of the same
   loader (what a streaming / IterableDataset resume costs), and iterating 10,000 batches of the
   batch sampler without fetching (accelerate's `SkipBatchSampler`, which transformers uses for
   map-style data).
2. Save blocking: a stack of Linear layers (~67 MB fp32, ~200 MB checkpoint with AdamW state),
   runs with no saves, sync saves and `save_async=True`, interleaved. Blocking per save = step
   time of a saving step minus the median of the run's non-saving steps (wall, and CPU time of
   the training thread, which the machine's other load disturbs less). Async checkpoints are
   deep-verified and their tensor files compared by hash with the sync run's.
3. A profile of the save and load path on the big checkpoint.
4. Against the disk (`--only disk` runs this part alone): a sync save (`Trainer._save_checkpoint`,
   fsync and manifest included) and a verified load (hash check of every file, then model,
   optimizer and trainer state; page cache dropped first with posix_fadvise) of that checkpoint,
   as a fraction of the disk's own bandwidth measured in the same run: one sequential write of as
   many bytes with fsync, and a cold read of it (the load starts, like that read, right after as
   many bytes left the page cache). Also the same write with O_DIRECT (what the device takes with
   no page-cache page to find), and the hash speeds (xxh3_128, sha256) per GB.

One torch thread, OMP_WAIT_POLICY=PASSIVE; medians over interleaved repetitions.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ember import TrainerCallback  # noqa: E402  (light: ember imports nothing heavy up front)

from .checkpoint_report import markdown, seconds_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    reps: int = 15
    replay_reps: int = 3
    dataset_size: int = 2_000_000
    batch: int = 8
    near_step: int = 10
    far_step: int = 10_000
    save_layers: int = 16
    save_width: int = 1024
    save_every: int = 10
    saves: int = 7  # the last one is at the final step: counted in wall time, not in per-step blocking
    save_reps: int = 3
    profile_reps: int = 3


SMOKE = Config(
    reps=1, replay_reps=1, dataset_size=20_000, far_step=40, save_layers=2, save_width=64, save_every=4,
    saves=3, save_reps=1, profile_reps=1,
)  # fmt: skip


# -- workloads -----------------------------------------------------------------------------------------


class PointData:
    """Map-style, `size` samples, each built on demand: one float in, one float target."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = (i % 1009) / 1009.0
        return {"x": torch.tensor([x]), "labels": torch.tensor([3.0 * x - 1.0])}


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.lin(x)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else out.sum() * 0
        return {"loss": loss, "logits": out}


class VectorData:
    """`size` samples of `width` floats, drawn from a small fixed bank so no big tensor is materialised."""

    def __init__(self, size: int, width: int, bank: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.size, self.x, self.y = (
            size,
            torch.randn(bank, width, generator=g),
            torch.randn(bank, width, generator=g),
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = i % len(self.x)
        return {"x": self.x[j], "labels": self.y[j]}


class LinearStack(nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        out = self.layers[-1](x)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else out.sum() * 0
        return {"loss": loss, "logits": out}


# -- trainer helpers -----------------------------------------------------------------------------------


def make_trainer(model: nn.Module, dataset: Any, out: Path, callbacks: list[Any], **overrides: Any) -> Any:
    from ember import Trainer, TrainingArguments
    from ember.callbacks import PrinterCallback, ProgressCallback

    kwargs: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 8,
        "num_train_epochs": 1,
        "save_strategy": "no",
        "logging_steps": 500,
        "disable_tqdm": True,
        "report_to": "none",
        "seed": 0,
    }
    kwargs.update(overrides)
    trainer = Trainer(
        model=model, args=TrainingArguments(**kwargs), train_dataset=dataset, callbacks=callbacks
    )
    for quiet in (PrinterCallback, ProgressCallback):  # the timings must not include console output
        trainer.remove_callback(quiet)
    return trainer


class FirstStep(TrainerCallback):
    """Records when (wall and process CPU time) the first optimizer step of train() ends, then stops."""

    def __init__(self) -> None:
        self.at: tuple[float, float] | None = None
        self.step: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.at is None:
            self.at, self.step = (time.perf_counter(), time.process_time()), state.global_step
        control.should_training_stop = True


class SaveAt(TrainerCallback):
    """Saves at the given steps and stops after the last one."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            control.should_save = True
        if state.global_step >= max(self.steps):
            control.should_training_stop = True


class StepClock(TrainerCallback):
    """Per optimizer step: wall and training-thread CPU time at its start (step k lasts from its start
    to step k+1's, save included), and whether a background save was in flight when it started."""

    def __init__(self) -> None:
        self.begins: dict[int, tuple[float, float, bool]] = {}
        self.saved: list[int] = []
        self.writer: Any = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        busy = bool(self.writer is not None and self.writer.busy)
        self.begins[state.global_step + 1] = (time.perf_counter(), time.thread_time(), busy)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.saved.append(state.global_step)


def time_to_first_step(trainer: Any, resume: str | None) -> dict[str, Any]:
    """Wall and CPU seconds from `train()` to the end of its first step, and the checkpoint-restore
    part of that (`Trainer._resume`: verify, load weights/optimizer/state, set the data position)."""
    clock = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FirstStep))
    restore: list[float] = []
    inner = trainer._resume

    def timed_resume(checkpoint: Any) -> None:
        start = time.perf_counter()
        inner(checkpoint)
        restore.append(time.perf_counter() - start)

    trainer._resume = timed_resume
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train(resume_from_checkpoint=resume)
    assert clock.at is not None and clock.step is not None, "no optimizer step ran"
    return {
        "wall": clock.at[0] - wall,
        "cpu": clock.at[1] - cpu,
        "restore": sum(restore),
        "step": clock.step,
    }


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": med(values), "min": min(values), "max": max(values), "n": len(values), "values": values}


# -- 1. resume time against data position --------------------------------------------------------------


def make_resume_checkpoints(cfg: Config, work: Path) -> dict[str, Any]:
    out = work / "resume-src"
    trainer = make_trainer(
        Affine(), PointData(cfg.dataset_size), out, [SaveAt((cfg.near_step, cfg.far_step))]
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steps_per_epoch = len(trainer._train_batch_sampler)
    return {
        "near": str(out / f"checkpoint-{cfg.near_step}"),
        "far": str(out / f"checkpoint-{cfg.far_step}"),
        "train_seconds": seconds,
        "ms_per_step": 1000 * seconds / cfg.far_step,
        "steps_per_epoch": steps_per_epoch,
    }


def resume_once(cfg: Config, work: Path, checkpoint: str | None) -> dict[str, Any]:
    trainer = make_trainer(Affine(), PointData(cfg.dataset_size), work / "resume-run", [FirstStep()])
    return time_to_first_step(trainer, checkpoint)


def replay_once(cfg: Config, work: Path) -> tuple[float, float]:
    """(seconds to fetch+collate far_step batches, seconds to only draw their indices) on ember's loader."""
    trainer = make_trainer(Affine(), PointData(cfg.dataset_size), work / "replay", [])
    loader = trainer.get_train_dataloader()
    sampler = trainer._train_batch_sampler
    sampler.set_epoch(0)
    start = time.perf_counter()
    for _ in itertools.islice(loader, cfg.far_step):
        pass
    full = time.perf_counter() - start
    sampler.set_epoch(0)
    start = time.perf_counter()
    for _ in itertools.islice(iter(sampler), cfg.far_step):
        pass
    return full, time.perf_counter() - start


def bench_resume(cfg: Config, work: Path) -> dict[str, Any]:
    made = make_resume_checkpoints(cfg, work)
    resume_once(cfg, work, made["near"])  # warm-up: lazy imports, allocator, page cache
    runs: dict[str, list[dict[str, Any]]] = {"near": [], "far": [], "fresh": []}
    for rep in range(cfg.reps):
        for which in ["near", "far", "fresh"] if rep % 2 == 0 else ["fresh", "far", "near"]:
            runs[which].append(resume_once(cfg, work, made.get(which)))
    replay: dict[str, list[float]] = {"replay_full": [], "replay_indices": []}
    for _ in range(cfg.replay_reps):
        full, indices = replay_once(cfg, work)
        replay["replay_full"].append(full)
        replay["replay_indices"].append(indices)
    steps = {which: runs[which][-1]["step"] for which in runs}
    if steps["near"] != cfg.near_step + 1 or steps["far"] != cfg.far_step + 1:
        raise AssertionError(f"resumed runs did not continue where the checkpoints left off: {steps}")
    result: dict[str, Any] = {k: summary(v) for k, v in replay.items()}
    for which, rows in runs.items():
        result[which] = {m: summary([r[m] for r in rows]) for m in ("wall", "cpu", "restore")}
    result["ratio_far_near"] = {
        m: result["far"][m]["median"] / result["near"][m]["median"] for m in ("wall", "cpu", "restore")
    }
    result["first_step_after_resume"] = steps
    result["how_made"] = made
    return result


# -- 2. what a save blocks: none vs sync vs async --------------------------------------------------------


def save_job_trainer(cfg: Config, out: Path, mode: str, callbacks: list[Any], max_steps: int) -> Any:
    torch.manual_seed(0)
    model = LinearStack(cfg.save_layers, cfg.save_width)
    return make_trainer(
        model,
        VectorData(100_000, cfg.save_width),
        out,
        callbacks,
        max_steps=max_steps,
        save_strategy="no" if mode == "none" else "steps",
        save_steps=cfg.save_every,
        save_async=mode == "async",
        logging_strategy="no",
        learning_rate=1e-4,
    )


def run_save_job(cfg: Config, out: Path, mode: str) -> dict[str, Any]:
    clock = StepClock()
    n = cfg.saves * cfg.save_every
    trainer = save_job_trainer(cfg, out, mode, [clock], n)
    clock.writer = trainer.checkpointer.writer
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    b = clock.begins
    steps = range(1, n)  # the final step has no successor to end it; its save counts in `wall` only
    dur = {k: (b[k + 1][0] - b[k][0], b[k + 1][1] - b[k][1]) for k in steps}
    saving = [k for k in clock.saved if k < n]
    # Step 1 pays one-off costs (optimizer state allocation); it is no one's baseline.
    plain = [k for k in steps if k not in saving and k != 1]
    base_wall, base_cpu = med([dur[k][0] for k in plain]), med([dur[k][1] for k in plain])
    overlapped = [dur[k][0] for k in plain if b[k][2]]
    return {
        "wall": wall,
        "cpu": cpu,
        "median_step": base_wall,
        "median_step_cpu": base_cpu,
        "median_step_while_writing": med(overlapped) if overlapped else None,
        "median_step_not_writing": med([dur[k][0] for k in plain if not b[k][2]]),
        "blocking": [dur[k][0] - base_wall for k in saving],
        "blocking_cpu": [dur[k][1] - base_cpu for k in saving],
        "saves": len(clock.saved),
        "steps": n,
    }


def compare_checkpoints(sync_dir: Path, async_dir: Path) -> dict[str, Any]:
    from ember.checkpoint import sorted_checkpoints, verify_checkpoint

    sync_ckpts, async_ckpts = sorted_checkpoints(sync_dir), sorted_checkpoints(async_dir)
    problems = [f"{p.name}: {r}" for p in async_ckpts + sync_ckpts if (r := verify_checkpoint(p, deep=True))]
    if [p.name for p in sync_ckpts] != [p.name for p in async_ckpts]:
        problems.append(
            f"different checkpoints: {[p.name for p in sync_ckpts]} vs {[p.name for p in async_ckpts]}"
        )
    compared, other_diffs = 0, set()
    for a, b in zip(sync_ckpts, async_ckpts):
        ha, hb = _manifest_hashes(a), _manifest_hashes(b)
        for name in sorted(set(ha) | set(hb)):
            if name.endswith(".safetensors"):
                compared += 1
                if ha.get(name) != hb.get(name):
                    problems.append(f"{a.name}/{name}: tensor file differs")
            elif ha.get(name) != hb.get(name):
                other_diffs.add(name)
    return {
        "checkpoints": len(async_ckpts),
        "tensor_files_compared": compared,
        "problems": problems,
        "identical_tensors_and_verified": not problems and compared > 0,
        "json_files_that_differ": sorted(other_diffs),
    }


def _manifest_hashes(folder: Path) -> dict[str, str]:
    files = json.loads((folder / "manifest.json").read_text())["files"]
    # The hash the manifest recorded (xxh3_128; sha256 in manifests of older ember).
    return {name: info.get("xxh3_128") or info["sha256"] for name, info in files.items()}


def summarise_mode(rows: list[dict[str, Any]], none_wall: float) -> dict[str, Any]:
    """One save mode over its repetitions: per-save blocking pooled over runs, medians of the rest."""
    out: dict[str, Any] = {}
    for key in ("blocking", "blocking_cpu"):
        pooled = [x for r in rows for x in r[key]]
        out[key] = summary(pooled) if pooled else None
    for key in ("wall", "cpu"):
        out[key] = summary([r[key] for r in rows])
    for key in ("median_step", "median_step_cpu", "median_step_while_writing", "median_step_not_writing"):
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = med(vals) if vals else None
    saves = out["saves"] = rows[0]["saves"]
    out["steps"] = rows[0]["steps"]
    out["wall_overhead_per_save"] = (out["wall"]["median"] - none_wall) / saves if saves else None
    return out


def bench_saves(cfg: Config, work: Path) -> dict[str, Any]:
    modes = ["none", "sync", "async"]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    checks = []
    for rep in range(cfg.save_reps):
        order = modes[rep % 3 :] + modes[: rep % 3]
        for mode in order:
            runs[mode].append(run_save_job(cfg, work / f"save-{mode}", mode))
        checks.append(compare_checkpoints(work / "save-sync", work / "save-async"))
        if rep < cfg.save_reps - 1:  # the last rep's checkpoints feed the profile
            for mode in modes:
                shutil.rmtree(work / f"save-{mode}", ignore_errors=True)
    none_wall = med([r["wall"] for r in runs["none"]])
    result: dict[str, Any] = {mode: summarise_mode(runs[mode], none_wall) for mode in modes}
    for key in ("blocking", "blocking_cpu"):
        sync_b, async_b = (result[m][key]["median"] for m in ("sync", "async"))
        # None when async blocking is lost in step-time noise (<= 0): no meaningful ratio then.
        result[f"ratio_sync_async_{key}"] = sync_b / async_b if async_b > 0 else None
    result["checks"] = checks
    result["async_ok"] = all(c["identical_tensors_and_verified"] for c in checks)
    result["params"] = sum(p.numel() for p in LinearStack(cfg.save_layers, cfg.save_width).parameters())
    # The last periodic save, not the final one: a run resumed from the final step has nothing left to do.
    newest = work / "save-sync" / f"checkpoint-{(cfg.saves - 1) * cfg.save_every}"
    result["checkpoint_mb"] = sum(f.stat().st_size for f in newest.iterdir()) / 1e6
    result["profiled_checkpoint"] = str(newest)
    return result


# -- 3. profile of the save and load path ------------------------------------------------------------


def timed(fn: Callable[[], Any], reps: int, before: Callable[[], Any] | None = None) -> float:
    values = []
    for _ in range(reps):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return med(values)


def profile_save(cfg: Config, work: Path, trainer: Any) -> dict[str, float]:
    from ember.checkpoint import atomic, training
    from ember.checkpoint.files import hash_file
    from ember.checkpoint.model import save_model_files
    from ember.checkpoint.state_io import save_state
    from ember.checkpoint.writer import StagingBuffers

    staging = StagingBuffers()

    def snapshot(copy: bool) -> training.Snapshot:
        parts, args = trainer._stateful_parts(), trainer.args
        return training.take_snapshot(
            parts, trainer.strategy, args, trainer.state, trainer.processing_class, staging if copy else None
        )

    snap = snapshot(copy=True)
    tmp = work / "profile-save"

    def fresh() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_all() -> None:
        training.write_snapshot(snap, tmp)

    def fresh_and_written() -> None:
        fresh()
        write_all()

    def files() -> list[Path]:
        return sorted(p for p in tmp.iterdir() if p.name != "manifest.json")

    steps: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        ("take_snapshot_copy", lambda: snapshot(copy=True), None),
        ("take_snapshot_nocopy", lambda: snapshot(copy=False), None),
        ("save_model_files", lambda: save_model_files(snap.model, tmp, None, snap.model_state), fresh),
        ("save_state_optimizer", lambda: save_state(snap.optimizer or {}, tmp, "optimizer"), fresh),
        ("write_snapshot", write_all, fresh),
        ("write_manifest_fsync_and_hash", lambda: atomic.write_manifest(tmp), fresh_and_written),
        ("xxh3_128_all_files_cached", lambda: [hash_file(p, "xxh3_128") for p in files()], None),
        ("sha256_all_files_cached", lambda: [hash_file(p, "sha256") for p in files()], None),
    ]
    out = {name: timed(fn, cfg.profile_reps, before) for name, fn, before in steps}
    blob = b"".join(p.read_bytes() for p in files())
    raw = work / "profile-raw.bin"

    def raw_write() -> None:
        with open(raw, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())

    out["raw_write_fsync_same_bytes"] = timed(raw_write, cfg.profile_reps)
    out["bytes"] = float(len(blob))
    shutil.rmtree(tmp, ignore_errors=True)
    raw.unlink(missing_ok=True)
    return out


def profile_load(cfg: Config, work: Path, trainer: Any, folder: Path) -> dict[str, float]:
    from ember.checkpoint import load_checkpoint_dir, verify_checkpoint
    from ember.checkpoint.state_io import load_state
    from ember.checkpoint.training import load_model_weights

    model, optimizer = trainer.model, trainer.optimizer
    state = load_state(folder, "optimizer")
    out = {
        "verify_deep_hash": timed(lambda: load_checkpoint_dir(folder, deep=True), cfg.profile_reps),
        "verify_sizes_only": timed(lambda: verify_checkpoint(folder, deep=False), cfg.profile_reps),
        "load_model_weights": timed(lambda: load_model_weights(model, folder), cfg.profile_reps),
        "load_state_optimizer": timed(lambda: load_state(folder, "optimizer"), cfg.profile_reps),
        "optimizer_load_state_dict": timed(lambda: optimizer.load_state_dict(state), cfg.profile_reps),
    }
    resumes: list[dict[str, Any]] = []
    freshes: list[dict[str, Any]] = []
    for _ in range(cfg.profile_reps):
        for resume, into in ((str(folder), resumes), (None, freshes)):
            # Same max_steps as the run that wrote `folder`, so its schedule is resumed unchanged.
            t = save_job_trainer(
                cfg, work / "profile-resume", "none", [FirstStep()], cfg.saves * cfg.save_every
            )
            into.append(time_to_first_step(t, resume))
    out["trainer_resume_restore_part"] = med([r["restore"] for r in resumes])
    out["resume_to_first_step"] = med([r["wall"] for r in resumes])
    out["fresh_to_first_step"] = med([r["wall"] for r in freshes])
    return out


def bench_profile(cfg: Config, work: Path, newest: Path) -> dict[str, Any]:
    trainer = save_job_trainer(cfg, work / "profile-train", "none", [], 2)
    trainer.train()
    return {"save": profile_save(cfg, work, trainer), "load": profile_load(cfg, work, trainer, newest)}


# -- 4. against the disk ----------------------------------------------------------------------------------

_IO_CHUNK = 8 << 20


def _evict(paths: list[Path]) -> None:
    """Drop `paths` from the page cache (clean pages only: they were fsynced), so reads hit the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


class DiskProbe:
    """A plain sequential write of `nbytes` with fsync, and a cold read of it: the disk's own speed."""

    def __init__(self, work: Path, nbytes: int) -> None:
        self.path, self.nbytes = work / "disk-probe.bin", nbytes
        self.block, self.buffer = memoryview(os.urandom(_IO_CHUNK)), bytearray(_IO_CHUNK)

    def write(self) -> float:
        self.path.unlink(missing_ok=True)
        start = time.perf_counter()
        with open(self.path, "wb", buffering=0) as fh:
            left = self.nbytes
            while left > 0:
                left -= fh.write(self.block[: min(left, _IO_CHUNK)])
            os.fsync(fh.fileno())
        return time.perf_counter() - start

    def write_direct(self) -> float | None:
        """The same bytes written around the page cache (O_DIRECT, one write in flight) with fsync:
        what the device takes when no page-cache page has to be found first. None where the
        platform or the file system has no direct I/O."""
        if not getattr(os, "O_DIRECT", 0):
            return None
        import mmap

        buffer = memoryview(mmap.mmap(-1, _IO_CHUNK))  # page aligned, as O_DIRECT needs
        buffer[:] = self.block
        path = self.path.with_name("disk-probe-direct.bin")
        path.unlink(missing_ok=True)
        total = self.nbytes + (-self.nbytes % 4096)
        start = time.perf_counter()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError:
            return None
        try:
            done = 0
            while done < total:
                done += os.write(fd, buffer[: min(_IO_CHUNK, total - done)])
            os.fsync(fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - start
        path.unlink(missing_ok=True)
        return elapsed

    def read_cold(self) -> float:
        _evict([self.path])
        start = time.perf_counter()
        with open(self.path, "rb", buffering=0) as fh:
            while fh.readinto(self.buffer):
                pass
        return time.perf_counter() - start


def hash_speeds(files: list[Path], reps: int) -> dict[str, float]:
    """Seconds per GB of each hash over the checkpoint's bytes, already in memory (CPU cost only)."""
    import hashlib

    import xxhash

    blob = memoryview(b"".join(p.read_bytes() for p in files))

    def run(make: Callable[[], Any]) -> None:
        h = make()
        for i in range(0, len(blob), _IO_CHUNK):
            h.update(blob[i : i + _IO_CHUNK])

    gb = len(blob) / 1e9
    return {
        name: timed(lambda make=make: run(make), reps) / gb
        for name, make in (("xxh3_128", xxhash.xxh3_128), ("sha256", hashlib.sha256))
    }


def bench_disk(cfg: Config, work: Path) -> dict[str, Any]:
    """Each rep times the disk probe right before the ember operation it is compared with (the
    machine is shared: its disk speed drifts within a minute), and the fraction is taken per rep."""
    from ember.checkpoint import load_checkpoint_dir, load_state
    from ember.checkpoint.training import load_model_weights

    trainer = save_job_trainer(cfg, work / "disk-train", "sync", [], 2)
    trainer.train()  # step 2: model and AdamW state exist; no checkpoint yet (save_every > 2)
    out_dir = Path(trainer.args.output_dir)
    model, step = trainer.model, [1000]

    def save() -> Path:
        step[0] += 1
        trainer.state.global_step = step[0]
        trainer._save_checkpoint(None)
        return out_dir / f"checkpoint-{step[0]}"

    folder = save()  # warm-up, and the size of what the probe writes
    files = _files(folder)
    nbytes = sum(p.stat().st_size for p in files)
    probe = DiskProbe(work, nbytes)

    def verified_load(where: Path) -> None:
        load_checkpoint_dir(where, deep=True)
        load_model_weights(model, where)
        load_state(where, "optimizer")
        load_state(where, "trainer")

    names = ("disk_write", "disk_write_direct", "save", "disk_read", "load", "verify")
    rows: dict[str, list[float]] = {k: [] for k in names}
    reps = max(cfg.profile_reps, 5) if cfg.profile_reps > 1 else 1
    for _ in range(reps):
        direct = probe.write_direct()
        if direct is not None:
            rows["disk_write_direct"].append(direct)
        rows["disk_write"].append(probe.write())
        start = time.perf_counter()
        folder = save()
        rows["save"].append(time.perf_counter() - start)
        files = _files(folder)
        rows["disk_read"].append(probe.read_cold())
        # The probe's read starts right after its 202 MB left the page cache, and on a VM whose
        # free memory goes back to the host, pages just dropped are what a read gets cheaply. The
        # load gets the same: the probe's file is dropped with the checkpoint's (which, written
        # with O_DIRECT, is not in the page cache at all).
        _evict([*files, probe.path])
        start = time.perf_counter()
        verified_load(folder)
        rows["load"].append(time.perf_counter() - start)
        _evict(files)
        start = time.perf_counter()
        load_checkpoint_dir(folder, deep=True)
        rows["verify"].append(time.perf_counter() - start)
    probe.path.unlink(missing_ok=True)
    load_warm = timed(lambda: verified_load(folder), cfg.profile_reps)
    m = {k: med(v) for k, v in rows.items() if v}
    direct_rows = rows["disk_write_direct"]
    result = {
        "bytes": nbytes,
        "files": len(files),
        "reps": reps,
        "per_rep": rows,
        "disk": {"write_fsync": m["disk_write"], "read_cold": m["disk_read"]},
        "disk_write_MBps": nbytes / m["disk_write"] / 1e6,
        "disk_read_cold_MBps": nbytes / m["disk_read"] / 1e6,
        "sync_save": m["save"],
        "sync_save_MBps": nbytes / m["save"] / 1e6,
        "verified_load_cold": m["load"],
        "verified_load_cold_MBps": nbytes / m["load"] / 1e6,
        "verified_load_warm": load_warm,
        "verify_only_cold": m["verify"],
        "save_fraction_of_disk": med([d / x for d, x in zip(rows["disk_write"], rows["save"])]),
        "load_fraction_of_disk": med([d / x for d, x in zip(rows["disk_read"], rows["load"])]),
        **(
            {
                "disk_write_direct": m["disk_write_direct"],
                "disk_write_direct_MBps": nbytes / m["disk_write_direct"] / 1e6,
                "save_fraction_of_direct_write": med([d / x for d, x in zip(direct_rows, rows["save"])]),
            }
            if direct_rows
            else {}
        ),
        "hash_seconds_per_GB": hash_speeds(files, cfg.profile_reps),
        "load_avg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


# -- report ----------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round (< 30 s)")
    p.add_argument("--reps", type=int, default=None, help="interleaved resume repetitions")
    p.add_argument("--save-reps", type=int, default=None, help="interleaved repetitions of each save mode")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--work", default=None, help="scratch folder for checkpoints (default: a temp folder)")
    p.add_argument(
        "--only", choices=["disk"], default=None, help="run one part alone (disk: section 4, ~1 minute)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ns = parse(argv)
    torch.set_num_threads(ns.threads)
    logging.getLogger("ember").setLevel(logging.WARNING)
    cfg = SMOKE if ns.smoke else Config()
    overrides = {k: v for k, v in (("reps", ns.reps), ("save_reps", ns.save_reps)) if v is not None}
    cfg = Config(**{**asdict(cfg), **overrides})
    work = Path(ns.work or tempfile.mkdtemp(prefix="ember-bench-ckpt-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result: dict[str, Any] = {"config": asdict(cfg), "machine": machine(), "smoke": ns.smoke}
        if ns.only == "disk":
            result["disk"] = bench_disk(cfg, work)
            return _report(result, Path(ns.out), "checkpoint-disk-smoke" if ns.smoke else "checkpoint-disk")
        result["resume"] = bench_resume(cfg, work)
        r = result["resume"]
        near, far = seconds_text(r["near"]["wall"]["median"]), seconds_text(r["far"]["wall"]["median"])
        print(f"resume: {near} near, {far} far, ratio {r['ratio_far_near']['wall']:.2f}", flush=True)
        result["saves"] = bench_saves(cfg, work)
        result["profile"] = bench_profile(cfg, work, Path(result["saves"]["profiled_checkpoint"]))
        result["disk"] = bench_disk(cfg, work)
    finally:
        if ns.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return _report(result, Path(ns.out), "checkpoint-smoke" if ns.smoke else "checkpoint")


def _report(result: dict[str, Any], out: Path, stem: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
