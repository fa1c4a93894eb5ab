"""Taking `output_dir` for one run: the lock (lock.py) on the main process, the verdict shared with
every rank, then the leftovers of an interrupted run cleaned (rotation.py). Its own module because
rotation asks the lock whether a folder is held: lock.py importing rotation would be a cycle.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import HashedCheckpoint, checkpoint_step, find_resumable_checkpoint
from .lock import OutputDirLockedError, RunLock
from .rotation import recover_output_dir

if TYPE_CHECKING:
    from ..strategy.base import Strategy

logger = logging.getLogger("ember")


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike[str], strategy: Strategy) -> Iterator[RunLock | None]:
    """Hold the run lock on `output_dir` for the duration of the block.

    Only the main process (global rank 0) locks; it tells the other ranks whether it got the lock,
    so on refusal every rank raises the same error instead of waiting in a collective. Once
    locked, the leftovers of an earlier interrupted run are cleaned (`recover_output_dir`).
    """
    lock = RunLock(output_dir) if strategy.is_main else None
    refused: str | None = None
    if lock is not None:
        try:
            lock.acquire()
        except OutputDirLockedError as exc:
            refused = str(exc)
    if strategy.world_size > 1:
        refused = strategy.broadcast_object(refused)
    if refused is not None:
        raise OutputDirLockedError(refused)
    try:
        if lock is not None:
            recover_output_dir(output_dir)
        yield lock
    finally:
        if lock is not None:
            lock.release()


def auto_resume_checkpoint(
    output_dir: str | os.PathLike[str], strategy: Strategy, why: str, verify: bool = True
) -> str | None:
    """The newest usable checkpoint of `output_dir` for a job that resumes by itself, or None to
    start fresh. The main process looks (after `hold_output_dir` cleaned the leftovers of the
    interrupted run) and tells every rank, so all ranks resume from the same folder even where
    their views of a shared file system lag. Logged either way, with `why` (what turned it on).

    With `verify` (verify_checkpoints) each candidate's hashes are checked too, so a newest
    checkpoint changed after writing (a flipped byte, a bad copy) is skipped for the one before it,
    which a relaunched job can resume from instead of stopping; the skipped one is named with the
    reason and left in place. (A checkpoint named in `resume_from_checkpoint` is never swapped
    for another: a failing one is an error.)
    """
    found: str | None = None
    skipped: list[tuple[Path, str]] = []
    if strategy.is_main:
        path = find_resumable_checkpoint(output_dir, deep=verify, skipped=skipped)
        # Marked as hashed, so the resume that follows checks its sizes but does not hash it twice.
        found = (HashedCheckpoint if verify else str)(path) if path is not None else None
    if strategy.world_size > 1:
        found = strategy.broadcast_object(found)
    if strategy.is_main:
        passed = "".join(f"; skipped {p.name} ({reason}), left in place" for p, reason in skipped)
        if found is None:
            logger.warning(
                "ember: auto_resume (%s): no complete checkpoint in %s%s; starting fresh.",
                why,
                output_dir,
                passed,
            )
        else:
            logger.warning(
                "ember: auto_resume (%s): resuming from %s (step %s)%s.",
                why,
                found,
                checkpoint_step(Path(found)),
                passed,
            )
    return found
