"""Atomic checkpoint folders: write into `checkpoint-N.tmp/`, fsync, add a manifest, rename.

A checkpoint is complete exactly when its `manifest.json` exists and every file it lists has the
recorded size (and, for a deep check, hash: xxh3_128, or sha256 in manifests of older versions).
The manifest is written last, so a crash at any point leaves either no `checkpoint-N/` at all or a
complete one; a folder truncated afterwards (a full disk on a copy, a bad sync) is caught by the
sizes, a same-size change (a flipped byte) by the hash, which resume checks by default.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import (
    HASH_NAME,
    HASH_NAMES,
    CheckpointError,
    forget_digests,
    hash_file,
    known_digest,
    read_json,
    resolve_inside,
)

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "atomic_checkpoint",
    "check_checkpoint_files",
    "find_resumable_checkpoint",
    "is_complete_checkpoint",
    "load_checkpoint_dir",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ember-checkpoint"
# 2: files are hashed with xxh3_128 (version 1: sha256).
MANIFEST_VERSION = 2
TMP_SUFFIX = ".tmp"
# The old folder of a re-saved step waits here until the new one is in place; the `.tmp` suffix
# makes rotation clean it up if a crash leaves it behind.
REPLACED_SUFFIX = ".replaced.tmp"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; nothing was left at the final path and older checkpoints are intact."""


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named `checkpoint-N`, else None."""
    m = _CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def sorted_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Every `checkpoint-N` folder in `output_dir`, oldest (smallest N) first; complete or not."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for n, p in sorted((n, p) for n, p in found if n is not None)]


def sha256_file(path: Path) -> str:
    return hash_file(path, "sha256")


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (renames, new files) durable."""
    _fsync_path(path, directory=True)


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms (Windows) cannot open folders; nothing to sync there
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        # A few file systems refuse fsync on folders; file data was already synced.
        if not (directory and exc.errno in (errno.EINVAL, errno.EBADF, errno.EACCES)):
            raise
    finally:
        os.close(fd)


def _payload_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME
    )


def write_manifest(folder: Path) -> dict[str, Any]:
    """fsync every file in `folder`, then write and fsync `manifest.json` (last, so it marks completion).

    Files ember wrote through `files.write_bytes` were hashed as they were written; only the others
    (`save_pretrained`'s, a tokenizer's) are read back to hash them.
    """
    files: dict[str, dict[str, Any]] = {}
    payload = _payload_files(folder)
    _fsync_all(payload)
    for path in payload:
        files[path.relative_to(folder).as_posix()] = {
            "size": path.stat().st_size,
            HASH_NAME: known_digest(path) or hash_file(path, HASH_NAME),
        }
    # Deepest first, so each folder's entry in its parent is synced after the folder itself.
    for sub in sorted({p.parent for p in payload} - {folder}, key=lambda p: -len(p.parts)):
        _fsync_path(sub, directory=True)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files}
    with open(folder / MANIFEST_NAME, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(folder, directory=True)
    return manifest


def _fsync_all(paths: list[Path]) -> None:
    """fsync every file in `paths`, all at once from a few threads: a file system with a journal
    (ext4, xfs) then commits the new files' metadata in one or two journal commits instead of one
    per file, ~3 ms each on the test machine's disk (a checkpoint has ~10 files, a sharded one more)."""
    if len(paths) < 2:
        for path in paths:
            _fsync_path(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(paths), 16), thread_name_prefix="ember-fsync") as pool:
        for future in [pool.submit(_fsync_path, path) for path in paths]:
            future.result()  # the first error raises, once every fsync is over


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    forget_digests(path)


def _publish(tmp: Path, final_dir: Path) -> None:
    """Rename `tmp` to `final_dir`; an existing `final_dir` is moved aside and deleted only afterwards."""
    replaced = None
    if final_dir.exists():
        replaced = final_dir.with_name(final_dir.name + REPLACED_SUFFIX)
        _rmtree(replaced)
        os.replace(final_dir, replaced)
    try:
        os.replace(tmp, final_dir)
    except BaseException:
        if replaced is not None:
            os.replace(replaced, final_dir)
        raise
    _fsync_path(final_dir.parent, directory=True)
    if replaced is not None:
        _rmtree(replaced)


@contextlib.contextmanager
def atomic_checkpoint(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh `<final_dir>.tmp/` to write into; on success it becomes `final_dir` atomically.

    Any failure (in the body or while finishing) deletes the tmp folder, leaves every other folder
    alone and raises `CheckpointWriteError` chained to the cause. Ctrl-C also cleans up, and
    propagates unchanged.
    """
    tmp = begin_checkpoint(final_dir)
    try:
        yield tmp
    except Exception as exc:
        raise abort_checkpoint(tmp, final_dir, exc) from exc
    except BaseException:
        _rmtree(tmp)
        raise
    commit_checkpoint(tmp, final_dir)


def begin_checkpoint(final_dir: str | os.PathLike[str]) -> Path:
    """Create a fresh `<final_dir>.tmp/` and return it: the first half of `atomic_checkpoint`, for
    writers (several processes) that fill the folder from more than one place."""
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + TMP_SUFFIX)
    try:
        _rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise _write_error(final_dir, "creating the temporary folder", exc) from exc
    return tmp


def commit_checkpoint(tmp: Path, final_dir: str | os.PathLike[str]) -> None:
    """Write the manifest of a filled `tmp` folder and rename it to `final_dir` (the second half)."""
    final_dir = Path(final_dir)
    try:
        write_manifest(tmp)
        _publish(tmp, final_dir)
    except Exception as exc:
        _rmtree(tmp)
        raise _write_error(final_dir, "writing", exc) from exc


def abort_checkpoint(
    tmp: Path | None, final_dir: str | os.PathLike[str], exc: BaseException, action: str = "writing"
) -> CheckpointWriteError:
    """Remove a half-written `tmp` folder (None: another process does); the error to raise, which
    names the newest intact checkpoint."""
    if tmp is not None:
        _rmtree(tmp)
    return _write_error(Path(final_dir), action, exc)


def _write_error(final_dir: Path, action: str, exc: BaseException) -> CheckpointWriteError:
    if isinstance(exc, OSError) and exc.errno is not None:
        what = f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
        if exc.strerror and exc.strerror != os.strerror(exc.errno):
            what += f" ({exc.strerror})"
        if exc.filename:
            what += f": '{exc.filename}'"
    else:
        what = f"{type(exc).__name__}: {exc}"
    newest = _newest_complete(final_dir.parent, exclude=final_dir)
    intact = f"newest complete one: {newest.name}" if newest else "there is no earlier complete checkpoint"
    error = CheckpointWriteError(
        f"Could not save checkpoint {final_dir} ({action} failed): {what}. No partial checkpoint was left; "
        f"earlier checkpoints in {final_dir.parent} are intact ({intact})."
    )
    error.errno = exc.errno if isinstance(exc, OSError) else None
    return error


def _newest_complete(output_dir: Path, exclude: Path | None = None) -> Path | None:
    for path in reversed(sorted_checkpoints(output_dir)):
        if path != exclude and is_complete_checkpoint(path):
            return path
    return None


def verify_checkpoint(path: str | os.PathLike[str], deep: bool = True) -> str | None:
    """None when `path` is a complete checkpoint, else the reason it is not.

    `deep=False` compares sizes only (cheap; catches truncation); `deep=True` also re-hashes every
    file with the hash its manifest recorded (xxh3_128; sha256 in manifests of ember before it).
    """
    path = Path(path)
    if not path.is_dir():
        return "not a folder" if path.exists() else "does not exist"
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no {MANIFEST_NAME} (incomplete write)"
    try:
        manifest = read_json(manifest_path)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            return f"{MANIFEST_NAME} is not an ember checkpoint manifest"
        version = manifest.get("version")
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            return (
                f"{MANIFEST_NAME} has version {version!r}; this ember reads up to {MANIFEST_VERSION} "
                "(upgrade ember to resume from it)"
            )
    except CheckpointError as exc:
        return str(exc)
    except (KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST_NAME} is not an ember checkpoint manifest ({type(exc).__name__}: {exc})"
    root = path.resolve()
    for rel, info in files.items():
        file = (path / rel).resolve()
        if root not in file.parents:
            return f"{MANIFEST_NAME} lists {rel!r}, which is outside the checkpoint"
        if not file.is_file():
            return f"{rel}: missing file"
        try:
            expected = int(info["size"])
        except (KeyError, TypeError, ValueError, OverflowError):
            return f"{MANIFEST_NAME} has no valid size for {rel}"
        size = file.stat().st_size
        if size != expected:
            how = "truncated" if size < expected else "grew after writing"
            return f"{rel}: size {size} != {expected} ({how})"
        if deep:
            algo = next((name for name in HASH_NAMES if isinstance(info.get(name), str)), None)
            if algo is None:
                return f"{MANIFEST_NAME} has no hash for {rel}"
            if hash_file(file, algo) != info[algo]:
                return f"{rel}: {algo} hash mismatch (changed after writing)"
    return None


def is_complete_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when `path` has a manifest and every listed file has its recorded size."""
    return verify_checkpoint(path, deep=False) is None


# The JSON files ember itself reads back from a checkpoint; `<name>.json` beside a
# `<name>.safetensors` is a `save_state` pair (optimizer, trainer, rank-N, ZeRO partitions).
_READ_BACK = ("trainer_state.json", "training_args.json", "model.safetensors.index.json")


def check_checkpoint_files(path: str | os.PathLike[str]) -> None:
    """Read every JSON file ember will load from checkpoint `path` (bounded, see `files.read_json`)
    and check that each file name they hold stays inside the folder; `CheckpointError` naming the
    file and entry otherwise. Run before anything is restored, so a bad file cannot leave a
    half-restored trainer, and `resume_from_checkpoint=True` can fall back to an older checkpoint."""
    path = Path(path)
    for json_path in sorted(path.rglob("*.json")):
        if json_path.name == MANIFEST_NAME:
            continue
        if json_path.name not in _READ_BACK and not json_path.with_suffix(".safetensors").is_file():
            continue
        doc = read_json(json_path)
        if json_path.name == "trainer_state.json":
            if not isinstance(doc, dict):
                raise CheckpointError(f"{json_path} does not hold a JSON object; the file is damaged.")
            best = doc.get("best_model_checkpoint")
            if best is not None and not isinstance(best, str):
                raise CheckpointError(f"{json_path}: best_model_checkpoint = {best!r} is not a path.")
        elif json_path.name == "model.safetensors.index.json":
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{json_path} has no weight_map; the file is damaged.")
            for key, shard in weight_map.items():
                resolve_inside(path, shard, json_path, f"weight_map[{key!r}]")
        elif isinstance(doc, dict) and "tensors" in doc:
            resolve_inside(json_path.parent, doc["tensors"], json_path, '"tensors"')


def usable_checkpoint(path: str | os.PathLike[str], deep: bool = False) -> str | None:
    """None when checkpoint `path` can be resumed from (manifest and sizes, the JSON files ember
    reads, and with `deep` every file's hash), else the reason it cannot."""
    reason = verify_checkpoint(path, deep=deep)
    if reason is None:
        try:
            check_checkpoint_files(path)
        except CheckpointError as exc:
            reason = str(exc)
    return reason


def find_resumable_checkpoint(
    output_dir: str | os.PathLike[str], deep: bool = False, skipped: list[tuple[Path, str]] | None = None
) -> Path | None:
    """The newest `checkpoint-N` in `output_dir` that can be resumed from (`usable_checkpoint`);
    each one skipped on the way is logged with its reason (and appended to `skipped`). Nothing is
    deleted: a folder that fails may be a copy in progress, or evidence."""
    for path in reversed(sorted_checkpoints(output_dir)):
        reason = usable_checkpoint(path, deep=deep)
        if reason is None:
            return path
        logger.warning("Skipping checkpoint %s: %s.", path, reason)
        if skipped is not None:
            skipped.append((path, reason))
    return None


class HashedCheckpoint(str):
    """A checkpoint folder whose every file this process has just hashed against its manifest
    (auto_resume's pick): `load_checkpoint_dir` checks its sizes but does not hash it again."""


def load_checkpoint_dir(path: str | os.PathLike[str], deep: bool = False) -> Path:
    """Check a checkpoint named by the user before anything reads it.

    The manifest and every file's size are checked: that catches incomplete writes and truncation
    in about a millisecond. `deep=True` (what resume does unless `verify_checkpoints=False`) also
    re-hashes every byte against the manifest, which catches a same-size change; with xxh3_128 that
    costs about the time of reading the files (see README, "Failure behaviour").
    A run folder (one holding `checkpoint-N` folders, not a checkpoint itself) stands for its newest
    usable checkpoint, as `resume_from_checkpoint=True` does.
    """
    hashed = isinstance(path, HashedCheckpoint)
    path = Path(path)
    if checkpoint_step(path) is None and not (path / MANIFEST_NAME).exists() and sorted_checkpoints(path):
        found = find_resumable_checkpoint(path, deep=deep)
        if found is None:
            raise CheckpointError(
                f"Cannot resume from {path}: it is a run folder, and none of its checkpoints is complete "
                "(see the warnings above). Pass a checkpoint folder, or start without resuming."
            )
        logger.info("%s is a run folder; resuming from its newest complete checkpoint, %s.", path, found.name)
        return found
    reason = usable_checkpoint(path, deep=deep and not hashed)
    if reason is None:
        return path
    fallback = _newest_complete(path.parent, exclude=path)
    hint = f"the newest complete one there is {fallback}" if fallback else "none there is complete"
    raise CheckpointError(
        f"Cannot resume from checkpoint {path}: {reason}. Pass another checkpoint to "
        f"resume_from_checkpoint, or True to pick the newest complete one ({hint})."
    )
