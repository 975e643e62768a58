"""Peak resident memory of a call on Linux (VmHWM, reset through /proc/self/clear_refs).

Used by the benchmark scripts. Set ``MALLOC_MMAP_THRESHOLD_`` before the process starts (see
:func:`pin_malloc_threshold`) so that large freed buffers really return to the OS between calls.
"""

from __future__ import annotations

import gc
import os
import sys


def pin_malloc_threshold(threshold: int = 1 << 20) -> None:
    """Re-execute this script once with glibc's adaptive mmap threshold pinned (Linux only)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
        os.execv(sys.executable, [sys.executable] + sys.argv)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Hand memory that glibc keeps for reuse back to the OS, so a new allocation shows in RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(fn):
    """Run ``fn()`` once; return (its result, peak extra resident MiB or None where unsupported)."""
    gc.collect()
    _release_free_heap()
    baseline = _status_kib("VmRSS")
    if baseline is None or not _reset_high_water():
        return fn(), None
    result = fn()
    peak = _status_kib("VmHWM")
    return result, (None if peak is None else max(0.0, (peak - baseline) / 1024))
