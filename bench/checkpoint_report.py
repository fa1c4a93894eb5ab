"""Markdown rendering of `python -m bench.checkpoint` results (no torch: reads the result dict only)."""

from __future__ import annotations

from typing import Any


def seconds_text(x: float | None) -> str:
    """1.5 ms / 2.31 s / - (none)."""
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if abs(x) < 1 else f"{x:.2f} s"


def _spread(v: dict[str, Any]) -> str:
    return f"{seconds_text(v['median'])} ({seconds_text(v['min'])} to {seconds_text(v['max'])})"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _md_resume(cfg: dict[str, Any], r: dict[str, Any]) -> list[str]:
    made, near, far, ratio = r["how_made"], cfg["near_step"], cfg["far_step"], r["ratio_far_near"]
    lines = [
        f"## 1. Resume time against data position ({cfg['dataset_size']:,} samples, batch {cfg['batch']}, "
        f"{made['steps_per_epoch']:,} steps per epoch)",
        "",
        f"The step-{far:,} checkpoint is real, not forged: one run trained {far:,} steps of a 1-float affine "
        f"model in {made['train_seconds']:.1f} s ({made['ms_per_step']:.2f} ms/step), saving at steps {near} "
        f"and {far:,}. Timed: `train(resume_from_checkpoint=...)` until the first resumed optimizer step "
        "ends, on a fresh Trainer each time (wall and process CPU time), and within it the checkpoint "
        "restore (`Trainer._resume`: verify, load, set the data position). Medians of "
        f"{cfg['reps']} interleaved reps after one warm-up.",
        "",
        _row("", "to first step, wall (min to max)", "to first step, CPU", "restore part, wall"),
        _row(*["---"] * 4),
    ]
    for name, key in ((f"resume from step {near}", "near"), (f"resume from step {far:,}", "far")):
        v = r[key]
        lines.append(_row(name, _spread(v["wall"]), seconds_text(v["cpu"]["median"]), _spread(v["restore"])))
    f = r["fresh"]
    lines += [
        _row("fresh start, no resume", _spread(f["wall"]), seconds_text(f["cpu"]["median"]), "-"),
        _row(f"**ratio step {far:,} / step {near}**", f"**{ratio['wall']:.2f}**", f"{ratio['cpu']:.2f}",
             f"{ratio['restore']:.2f}"),
        "",
        f"For contrast, finding step {far:,} by replay instead ({cfg['replay_reps']} reps):",
        "",
        _row("replay", "median (min to max)"),
        _row("---", "---"),
        _row(f"fetch + collate {far:,} batches of ember's loader (what a streaming/iterable resume costs)",
             _spread(r["replay_full"])),
        _row(f"draw {far:,} batches of indices from the sampler, no fetch (accelerate's SkipBatchSampler, "
             "which transformers uses for map-style data)", _spread(r["replay_indices"])),
        "",
    ]  # fmt: skip
    return lines


def _md_saves(cfg: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lines = [
        f"## 2. What a save blocks ({s['params'] / 1e6:.1f} M fp32 params, {s['checkpoint_mb']:.0f} MB per "
        f"checkpoint with AdamW state, a save every {cfg['save_every']} steps, {s['sync']['steps']} steps)",
        "",
        "Blocking per save = duration of a saving step minus the run's median non-saving step, in wall "
        "time and in CPU time of the training thread. Pooled over the saves of "
        f"{cfg['save_reps']} interleaved reps (all but each run's final save, which has no next step).",
        "",
        _row("mode", "median step, wall / CPU", "blocking per save, wall (min to max)", "blocking, CPU",
             "run wall (min to max)", "run CPU, all threads", "wall overhead per save vs no saves"),
        _row(*["---"] * 7),
    ]  # fmt: skip
    for mode in ("none", "sync", "async"):
        v = s[mode]
        lines.append(
            _row(
                mode,
                f"{seconds_text(v['median_step'])} / {seconds_text(v['median_step_cpu'])}",
                _spread(v["blocking"]) if v["blocking"] else "-",
                seconds_text(v["blocking_cpu"]["median"]) if v["blocking_cpu"] else "-",
                _spread(v["wall"]),
                seconds_text(v["cpu"]["median"]),
                seconds_text(v["wall_overhead_per_save"]),
            )
        )
    ratio, ratio_cpu, checks, a = (
        s["ratio_sync_async_blocking"],
        s["ratio_sync_async_blocking_cpu"],
        s["checks"][-1],
        s["async"],
    )
    lines += [
        "",
        f"**Blocking sync / async: {f'{ratio:.1f}x' if ratio else 'async lost in noise'} in wall time, "
        f"{f'{ratio_cpu:.1f}x' if ratio_cpu else '-'} in training-thread CPU.** With async, non-saving "
        f"steps took {seconds_text(a['median_step_while_writing'])} (median) while a background write was "
        f"in flight and {seconds_text(a['median_step_not_writing'])} when none was.",
        "",
        f"Async checkpoints pass deep verification and their tensor files are byte-identical to the sync "
        f"run's: **{'yes' if s['async_ok'] else 'NO'}** ({checks['tensor_files_compared']} files in "
        f"{checks['checkpoints']} checkpoints per rep; JSON files that differ: "
        f"{', '.join(checks['json_files_that_differ']) or 'none'}).",
        "",
    ]
    return lines


def _md_profile(profile: dict[str, Any]) -> list[str]:
    save = [(k, v) for k, v in profile["save"].items() if k != "bytes"]
    load = list(profile["load"].items())
    lines = [
        "## 3. Where the time goes (the checkpoint of section 2, medians)",
        "",
        _row("save path", "time", "", "load path", "time"),
        _row(*["---"] * 5),
    ]
    for i in range(max(len(save), len(load))):
        a = (save[i][0], seconds_text(save[i][1])) if i < len(save) else ("", "")
        b = (load[i][0], seconds_text(load[i][1])) if i < len(load) else ("", "")
        lines.append(_row(*a, "", *b))
    return [*lines, "", f"Bytes per checkpoint (all files): {profile['save']['bytes'] / 1e6:.0f} MB."]


def _md_disk(d: dict[str, Any]) -> list[str]:
    disk, hashes = d["disk"], d["hash_seconds_per_GB"]
    mb = d["bytes"] / 1e6
    return [
        f"## 4. Against the disk ({mb:.0f} MB checkpoint, {d['files']} files; medians)",
        "",
        "Sync save: `Trainer._save_checkpoint` until it returns (write, fsync, manifest, rename). "
        "Verified load: the hash check of every file, then model, optimizer and trainer state, with "
        "the files (and the probe's) dropped from the page cache first. The disk: one sequential "
        "write of as many bytes with fsync, and a cold read of it, each timed right before the "
        f"operation it is compared with; fractions are medians of the per-rep ratios ({d['reps']} reps).",
        "",
        _row("", "time", "MB/s", "fraction of the disk"),
        _row(*["---"] * 4),
        _row(
            "disk: sequential write + fsync",
            seconds_text(disk["write_fsync"]),
            f"{d['disk_write_MBps']:.0f}",
            "1",
        ),
        *(
            [
                _row(
                    "disk: the same write with O_DIRECT + fsync",
                    seconds_text(d["disk_write_direct"]),
                    f"{d['disk_write_direct_MBps']:.0f}",
                    "",
                )
            ]
            if "disk_write_direct" in d
            else []
        ),
        _row(
            "disk: cold sequential read",
            seconds_text(disk["read_cold"]),
            f"{d['disk_read_cold_MBps']:.0f}",
            "1",
        ),
        _row(
            "**sync save**",
            seconds_text(d["sync_save"]),
            f"{d['sync_save_MBps']:.0f}",
            f"**{d['save_fraction_of_disk']:.2f}**",
        ),
        _row(
            "**verified load, cold cache**",
            seconds_text(d["verified_load_cold"]),
            f"{d['verified_load_cold_MBps']:.0f}",
            f"**{d['load_fraction_of_disk']:.2f}**",
        ),
        _row("verified load, warm cache", seconds_text(d["verified_load_warm"]), "", ""),
        _row("hash check alone, cold cache", seconds_text(d["verify_only_cold"]), "", ""),
        "",
        f"Hash cost on one core, bytes in memory: xxh3_128 {hashes['xxh3_128']:.3f} s/GB, "
        f"sha256 {hashes['sha256']:.3f} s/GB.",
        *(
            [
                "",
                f"Sync save against the O_DIRECT write: {d['save_fraction_of_direct_write']:.2f} "
                "(a buffered write must first find a page-cache page for every 4 KiB; see the README).",
            ]
            if "save_fraction_of_direct_write" in d
            else []
        ),
        *(
            [f"Load average at the end: {', '.join(f'{x:.1f}' for x in d['load_avg_at_end'])}."]
            if d.get("load_avg_at_end")
            else []
        ),
        "",
    ]


def markdown(res: dict[str, Any]) -> str:
    """The report of `bench.checkpoint.main`'s result dict, as Markdown."""
    m = res["machine"]
    load = ", ".join(f"{x:.1f}" for x in m["load_avg_at_start"] or [])
    lines = [
        "# Checkpoint benchmark (`python -m bench.checkpoint`)",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['processor']}), torch {m['torch']}, {m['torch_threads']} "
        f"thread(s), OMP_WAIT_POLICY={m['omp_wait_policy']}, Python {m['python']}, load average at start "
        f"{load} (shared machine), {m['date']}.",
        "",
        *(_md_resume(res["config"], res["resume"]) if "resume" in res else []),
        *(_md_saves(res["config"], res["saves"]) if "saves" in res else []),
        *(_md_profile(res["profile"]) if "profile" in res else []),
        *(_md_disk(res["disk"]) if "disk" in res else []),
    ]
    return "\n".join(lines) + "\n"
