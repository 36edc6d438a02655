"""Keep the memory a request or a batch frees inside the process, for the next one to reuse.

A ranking of 1,000 candidates allocates and frees tensors of 1-25 MB every call (the GSU's
outputs, the attention's [pairs, hidden] activations, the batch itself). glibc serves blocks
that large from fresh mappings, or trims the heap's free top back to the OS, so every call
faults its pages in again, 4 KiB at a time: measured on 2 cores, one call of the Ranker at
1,000 behaviours x 1,000 candidates took 48.6 ms with ~17,900 page faults (32 ms of them in the
kernel) and 31.0 ms with ~870 once freed memory was kept. The process then holds on to what its
largest call needed (bounded by the Ranker's row caps, or the training batch), which a scoring
or training process would touch again anyway.

`retain_freed_memory()` sets glibc's mmap and trim thresholds; it does nothing on other C
libraries, nor when the environment sets MUSE_RETAIN_FREED_MEMORY=0 (or glibc's own
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, which then decide).
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading

__all__ = ["retain_freed_memory"]

log = logging.getLogger(__name__)

# Blocks above this still get a mapping of their own, returned to the OS when freed: a rare huge
# tensor (a whole table copy) does not stay resident.
MMAP_THRESHOLD = 256 << 20
# Free memory at the top of a heap is kept up to this much.
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_lock = threading.Lock()
_state: dict[str, bool] = {}


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in this process (see the module docstring); once per
    process, thread-safe. Returns whether the setting is in force."""
    with _lock:
        if "done" not in _state:
            _state["done"] = _apply()
        return _state["done"]


def _apply() -> bool:
    if os.environ.get("MUSE_RETAIN_FREED_MEMORY", "1") == "0":
        log.debug("freed memory goes back to the OS: MUSE_RETAIN_FREED_MEMORY=0")
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        log.debug("glibc's malloc thresholds come from the environment")
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("not glibc: the C library's default memory policy stays")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("freed memory is kept in the process (blocks up to %d MiB): %s", MMAP_THRESHOLD >> 20, applied)
    return applied
