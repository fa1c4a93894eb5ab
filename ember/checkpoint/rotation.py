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

__all__ = ["remove_stale_tmp", "rotate_checkpoints", "sorted_checkpoints"]

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
    """Keep the newest `save_total_limit` complete checkpoints plus those in `keep`; return the deleted.

    The best model (passed in `keep`) never counts against the limit, so a limit of N always leaves
    the N newest checkpoints to resume from, plus the best one when it is older. Incomplete
    `checkpoint-N` folders are neither counted nor deleted: they are not ours to judge. `None` or a
    limit <= 0 keeps everything. Stale `*.tmp` folders are removed either way.
    """
    remove_stale_tmp(output_dir)
    if save_total_limit is None or save_total_limit <= 0:
        return []
    complete = [p for p in sorted_checkpoints(output_dir) if is_complete_checkpoint(p)]
    if len(complete) <= save_total_limit:
        return []
    kept_paths = {Path(p).resolve() for p in keep}
    survivors = set(complete[-save_total_limit:]) | {p for p in complete if p.resolve() in kept_paths}
    deleted = [p for p in complete if p not in survivors]
    for path in deleted:
        logger.info("Deleting older checkpoint %s (save_total_limit=%d).", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)
    return deleted
