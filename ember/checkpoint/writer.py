"""Writing checkpoints in the foreground or on one background thread.

Async contract: the caller snapshots everything it wants saved into CPU memory first
(`snapshot_to_cpu`), and `write_fn` only touches those copies, so training can keep updating the
parameters while the files are written. At most one save is in flight; an error from the
background is raised by the next `save()` or `wait()`, never dropped. Call `wait()` (or `close()`)
before the process ends and before anything reads or deletes checkpoint folders.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_checkpoint

logger = logging.getLogger(__name__)

WriteFn = Callable[[Path], None]


def snapshot_to_cpu(obj: Any, copy_tensor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A deep copy of a nested structure in which every tensor is a fresh CPU tensor (or what
    `copy_tensor` makes of it)."""
    if copy_tensor is None:
        copy_tensor = _fresh_cpu_copy
    if isinstance(obj, torch.Tensor):
        return copy_tensor(obj)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, snapshot_to_cpu(v, copy_tensor)) for k, v in obj.items())
    if isinstance(obj, Mapping):
        return {k: snapshot_to_cpu(v, copy_tensor) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(snapshot_to_cpu(v, copy_tensor) for v in obj)
    if isinstance(obj, list):
        return [snapshot_to_cpu(v, copy_tensor) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)


def _fresh_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


class StagingBuffers:
    """CPU tensors reused from one snapshot to the next, so an async save copies into memory that
    is already mapped instead of allocating (and page-faulting) the whole state again.

    Measured on a 200 MB state: 59 ms to copy into reused buffers against 413 ms for fresh ones.
    Reuse is only safe once the previous snapshot has been written: call `snapshot` after the
    writer's `wait()`.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def snapshot(self, obj: Any) -> Any:
        self._next = 0
        return snapshot_to_cpu(obj, self._copy)

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        index, self._next = self._next, self._next + 1
        src = tensor.detach()
        if index < len(self._buffers):
            buf = self._buffers[index]
            if buf.shape == src.shape and buf.dtype == src.dtype:
                return buf.copy_(src)
        fresh = _fresh_cpu_copy(src)
        if index < len(self._buffers):
            self._buffers[index] = fresh
        else:
            self._buffers.append(fresh)
        return fresh


class CheckpointWriter:
    """Runs `write_fn(tmp_folder)` inside `atomic_checkpoint`, now (`async_=False`) or in the background."""

    def __init__(self, async_: bool = False) -> None:
        self.async_ = async_
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    @property
    def busy(self) -> bool:
        """True while a background save has not finished."""
        return self._pending is not None and not self._pending.done()

    def save(
        self, final_dir: str | os.PathLike[str], write_fn: WriteFn, after: Callable[[], None] | None = None
    ) -> None:
        """Write a checkpoint to `final_dir` atomically; `after()` runs once it is in place.

        `after` runs on the same thread as the write (e.g. checkpoint rotation, which must not run
        while a save is half done). In async mode this returns as soon as the work is queued, after
        waiting for the previous save and re-raising its error if it failed.
        """
        final_dir = Path(final_dir)
        self.wait()
        if not self.async_:
            _write(final_dir, write_fn, after)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-checkpoint")
        self._pending = self._executor.submit(_write, final_dir, write_fn, after)

    def run(self, job: Callable[[], None]) -> None:
        """Run `job` now, or in async mode on the writer thread, with the same ordering and error
        rules as `save()`; for writers that need more than one atomic folder (several processes)."""
        self.wait()
        if not self.async_:
            job()
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-checkpoint")
        self._pending = self._executor.submit(job)

    def wait(self) -> None:
        """Block until the background save (if any) is done; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def settle(self) -> None:
        """Wait for the background save, logging (not raising) its error: for when another error
        is already on its way up."""
        try:
            self.wait()
        except Exception:
            logger.exception("The checkpoint being written in the background failed as well.")

    def close(self) -> None:
        """Wait for the last save, then stop the background thread. Raises that save's error, if any."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _write(final_dir: Path, write_fn: WriteFn, after: Callable[[], None] | None) -> None:
    with atomic_checkpoint(final_dir) as tmp:
        write_fn(tmp)
    logger.debug("Saved checkpoint %s", final_dir)
    if after is not None:
        after()
