"""One writer per run: an exclusive lock on `output_dir` while `train()` runs.

Two runs on one output folder delete each other's temporary folders and overwrite each other's
checkpoints, so the second is refused before it does anything. The lock is a POSIX record lock
(`fcntl.lockf`) on `output_dir/.ember.lock`: the kernel drops it when the process ends in any way
(kill -9 included), so a lock left by a dead run is taken over without asking anyone. Not
`flock`: a flock belongs to the open file, which forked dataloader workers share, so it would
outlive a killed trainer for as long as its workers linger; a record lock belongs to the process.
The price is that closing any descriptor of the file in the holding process drops it, so this
module never opens the file again while it holds it. The file also records pid, host and start
time, only to say who holds it.

The file is removed on release while still locked; whoever locks a file that is no longer at the
path (it raced with that removal) retries on the new one, so two runs never both hold "the" lock.
Record locks work on local file systems and on NFS (through the NFS lock protocol); where they
are unsupported the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = ".ember.lock"

# Folders locked by this process (resolved path -> lock). A record lock never refuses its own
# process, so a second lock on the same folder in this process is refused from here, and
# `held_elsewhere` must not probe (closing its probe would drop the lock, see above).
_HELD: dict[Path, RunLock] = {}


class OutputDirLockedError(RuntimeError):
    """Another live run holds the lock on this output_dir."""


class RunLock:
    """The exclusive lock on one output folder; `acquire()` raises `OutputDirLockedError` if taken."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        import fcntl

        if self.output_dir.resolve() in _HELD:
            raise self._locked_error()
        while True:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                # A folder this run cannot write to: nothing to protect from a second writer here,
                # and a checkpoint save will fail with its own clear error.
                logger.warning("Cannot create %s (%s); running without the output_dir lock.", self.path, exc)
                return
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked_error() from None
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    logger.warning(
                        "The file system of %s does not support file locks (%s); a second run on the "
                        "same output_dir will not be stopped.",
                        self.output_dir,
                        os.strerror(exc.errno),
                    )
                    return
                raise
            if self._still_at_path(fd):
                break
            os.close(fd)  # the previous holder removed this file while we waited on it: retry
        previous = _read_holder(fd)
        if previous:
            logger.info(
                "Took over the lock on %s left by %s, which has ended (a lock dies with its process).",
                self.output_dir,
                _describe(previous),
            )
        _write_holder(fd)
        self._fd = fd
        _HELD[self.output_dir.resolve()] = self

    def holder(self) -> dict[str, Any]:
        """The pid/host/start record of this lock (read through the held descriptor)."""
        return _read_holder(self._fd) if self._fd is not None else {}

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(self.output_dir.resolve(), None)
        with contextlib.suppress(OSError):
            # Removed while still locked, so nobody can lock it in between (see the module doc).
            if self._still_at_path(fd):
                os.unlink(self.path)
        os.close(fd)

    def _still_at_path(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def _locked_error(self) -> OutputDirLockedError:
        holder: dict[str, Any] = {}
        mine = _HELD.get(self.output_dir.resolve())
        if mine is not None:
            holder = mine.holder()  # through its own descriptor: opening another would unlock
        else:
            holder = self._read_holder_from_path()
        who = _describe(holder) if holder else "another process (it has not written its pid yet)"
        return OutputDirLockedError(
            f"output_dir {self.output_dir} is in use by another training run: {who} holds {self.path}. "
            "Two runs on one output_dir would overwrite each other's checkpoints. Give this run "
            "another output_dir, or stop the other run first (its lock goes away when it exits)."
        )

    def _read_holder_from_path(self) -> dict[str, Any]:
        holder: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                holder = _read_holder(fd)
            finally:
                os.close(fd)
        return holder

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def held_elsewhere(output_dir: str | os.PathLike[str]) -> bool:
    """True when another process holds the lock on `output_dir` (a cheap, non-blocking probe)."""
    import fcntl

    root = Path(output_dir)
    if root.resolve() in _HELD:
        return False
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # closing drops the probe's own shared lock
    return False


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike[str], strategy: Any) -> Iterator[RunLock | None]:
    """Hold the run lock on `output_dir` for the duration of the block.

    Only the main process (global rank 0) locks; it tells the other ranks whether it got the lock,
    so on refusal every rank raises the same error instead of waiting in a collective. Once
    locked, the leftovers of an earlier interrupted run are cleaned (`recover_output_dir`).
    """
    from .rotation import recover_output_dir

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


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    data = json.dumps(record).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    since = ""
    if isinstance(started, (int, float)):
        since = ", started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"
