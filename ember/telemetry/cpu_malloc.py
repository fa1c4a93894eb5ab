"""Keep freed tensor memory in the process heap between CPU training steps (glibc only).

A training step allocates and frees the same buffers every step: activations, gradients, optimizer
temporaries. glibc's malloc decides with moving thresholds whether a large block comes from `mmap`
(unmapped again on free) and when the free top of the heap goes back to the kernel (`trim`). Which
way it goes depends on the exact order of allocations, so two loops doing the same maths can differ:
on GPT-2 6x256 (`bench/results/cpu-malloc.md`) a step spent 2 to 20 ms of its ~370 ms in the kernel,
zeroing pages that the previous step had just handed back, depending on which loop ran it. Fixing
both thresholds (the largest mmap threshold glibc accepts, and a trim threshold of 1 GiB) stops the
round trip: memory the step needed at its peak stays mapped for the next step. Peak memory is
unchanged; what changes is that the process keeps its peak instead of shrinking between steps.

Set once per process (glibc has no way to read the old values back). A user who chose an allocator
(jemalloc/tcmalloc by LD_PRELOAD, or MALLOC_* / GLIBC_TUNABLES variables) keeps it: ember then
leaves malloc alone, as it does with `tune_cpu_malloc=False`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the ceiling glibc accepts on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30

_USER_CHOICE_VARS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
)

_applied = False


def user_chose_allocator(environ: Mapping[str, str] = os.environ) -> str | None:
    """The variable by which the user already chose how malloc behaves, or None."""
    for name in _USER_CHOICE_VARS:
        if name in environ:
            return name
    if "malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = environ.get("LD_PRELOAD", "")
    if any(lib in preload for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def keep_heap_between_steps() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when they are (now or before)."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    chosen = user_chose_allocator()
    if chosen is not None:
        logger.debug("ember: malloc left as set by %s", chosen)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either value also turns glibc's moving thresholds off.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    return _applied


def applied() -> bool:
    """Whether this process's malloc thresholds were fixed by `keep_heap_between_steps`."""
    return _applied
