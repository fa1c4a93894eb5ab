"""Deleting old checkpoints (`save_total_limit`) and the leftovers of interrupted writes and deletes.

A checkpoint is deleted by renaming it to `checkpoint-N.deleting.tmp` first (atomic) and removing
that afterwards, so a kill in the middle leaves a folder whose name says what it is, never a
half-deleted `checkpoint-N`. Whatever a killed run left is finished off at the next start, by the
run that holds the output folder's lock (`recover_output_dir`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from .atomic import fsync_dir, is_complete_checkpoint, sorted_checkpoints, verify_checkpoint
from .lock import held_elsewhere

logger = logging.getLogger(__name__)

__all__ = [
    "delete_checkpoint",
    "keep_only",
    "recover_output_dir",
    "remove_stale_tmp",
    "rotate_checkpoints",
    "sorted_checkpoints",
]

DELETING_SUFFIX = ".deleting.tmp"
# `checkpoint-N.tmp` (a write in progress when the process died), `checkpoint-N.replaced.tmp` (the
# old folder of a re-saved step) and `checkpoint-N.deleting.tmp` (a rotation cut short). Nothing
# else in output_dir is ours to delete.
_STALE_RE = re.compile(r"^checkpoint-\d+(\.replaced|\.deleting)?\.tmp$")


def remove_stale_tmp(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the `checkpoint-N*.tmp` folders left by a crash; returns what was removed.

    Only the run holding the output folder's lock may do this: while another process holds it,
    nothing is removed (those folders may be its saves in progress). Within the run, only call
    this when no save is in flight (with an async writer: after `wait()`, or as its `after` hook).
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    if held_elsewhere(root):
        logger.debug("Not cleaning %s: another run holds its lock.", root)
        return []
    removed = [p for p in root.iterdir() if p.is_dir() and _STALE_RE.match(p.name)]
    for path in removed:
        what = "an interrupted delete" if path.name.endswith(DELETING_SUFFIX) else "an interrupted write"
        logger.info("Removing %s, left by %s.", path, what)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def recover_output_dir(output_dir: str | os.PathLike[str]) -> list[Path]:
    """At the start of a run: finish what a killed run left half done, and report what is broken.

    Temporary folders are removed (info log). A `checkpoint-N` that does not check out (no manifest:
    a write or delete cut short by an older ember, or another library's folder; missing or
    truncated files) is never resumed from and is not deleted, since it may not be ours: it is
    reported once per start so it does not stay unnoticed. Returns the removed folders.
    """
    removed = remove_stale_tmp(output_dir)
    for path in sorted_checkpoints(output_dir):
        reason = verify_checkpoint(path, deep=False)
        if reason is not None:
            logger.warning(
                "%s is not a complete checkpoint (%s): it is never resumed from. Delete it if you do "
                "not need it.",
                path,
                reason,
            )
    return removed


def delete_checkpoint(path: Path) -> None:
    """Remove a checkpoint folder so that a kill at any moment leaves no torn `checkpoint-N`."""
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fsync_dir(path.parent)  # the rename is durable before any file inside goes
    shutil.rmtree(doomed, ignore_errors=True)


def rotate_checkpoints(
    output_dir: str | os.PathLike[str],
    save_total_limit: int | None,
    keep: Iterable[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Delete the oldest complete checkpoints until `save_total_limit` are left; return the deleted.

    transformers' counting: the newest checkpoint (to resume from) and those in `keep` (the best
    model) are never deleted, and they count against the limit, so `save_total_limit=2` with an
    older best leaves exactly the best and the newest; a limit smaller than the protected set
    leaves just the protected ones. Incomplete `checkpoint-N` folders are neither counted nor
    deleted: they are not ours to judge. `None` or a limit <= 0 keeps everything. Stale `*.tmp`
    folders are removed either way.
    """
    remove_stale_tmp(output_dir)
    if save_total_limit is None or save_total_limit <= 0:
        return []
    complete = [p for p in sorted_checkpoints(output_dir) if is_complete_checkpoint(p)]
    if len(complete) <= save_total_limit:
        return []
    kept_paths = {Path(p).resolve() for p in keep}
    protected = {complete[-1]} | {p for p in complete if p.resolve() in kept_paths}
    excess = len(complete) - max(save_total_limit, len(protected))
    deleted = [p for p in complete if p not in protected][: max(excess, 0)]
    for path in deleted:
        logger.info("Deleting older checkpoint %s (save_total_limit=%d).", path, save_total_limit)
        delete_checkpoint(path)
    return deleted


def keep_only(output_dir: str | os.PathLike[str], keep: str | os.PathLike[str]) -> list[Path]:
    """Delete every complete checkpoint in `output_dir` but `keep`; return the deleted.

    For the end of a run with `save_total_limit=1` and a best model, where transformers leaves
    the best checkpoint alone. Incomplete folders are left, as in `rotate_checkpoints`.
    """
    kept = Path(keep).resolve()
    doomed = [p for p in sorted_checkpoints(output_dir) if is_complete_checkpoint(p) and p.resolve() != kept]
    for path in doomed:
        logger.info("Deleting checkpoint %s (save_total_limit=1 keeps only the best).", path)
        delete_checkpoint(path)
    return doomed
