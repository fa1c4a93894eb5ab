"""Deleting old checkpoints (`save_total_limit`) and the leftovers of interrupted writes."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from .atomic import is_complete_checkpoint, sorted_checkpoints

logger = logging.getLogger(__name__)

__all__ = ["keep_only", "remove_stale_tmp", "rotate_checkpoints", "sorted_checkpoints"]

# `checkpoint-N.tmp` (a write in progress when the process died) and `checkpoint-N.replaced.tmp`
# (the old folder of a re-saved step). Nothing else in output_dir is ours to delete.
_STALE_RE = re.compile(r"^checkpoint-\d+(\.replaced)?\.tmp$")


def remove_stale_tmp(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete `checkpoint-N.tmp` folders left by a crash; returns what was removed.

    Only call this when no save is in flight (with an async writer: after `wait()`, or as its
    `after` hook), or it deletes the folder being written.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir() if p.is_dir() and _STALE_RE.match(p.name)]
    for path in removed:
        logger.info("Removing %s, left by an interrupted checkpoint write.", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


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
        shutil.rmtree(path, ignore_errors=True)
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
        shutil.rmtree(path, ignore_errors=True)
    return doomed
