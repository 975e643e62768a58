"""CPU memory helpers: glibc allocator tuning for fast inference, and peak resident memory of a call.

:func:`tune_cpu_allocator` keeps large freed buffers in the process heap so the next tensor of that
size reuses them. PyTorch has no caching allocator on CPU, and glibc serves every buffer above its
mmap threshold with a fresh ``mmap`` whose pages are faulted in (and zeroed) on first touch; for the
image encoders at 1024 px that page-fault traffic costs more than the elementwise work itself.

:func:`peak_memory_mib` measures peak resident memory (VmHWM, reset through /proc/self/clear_refs).
Benchmarks measure memory in a separate process started with ``MALLOC_MMAP_THRESHOLD_`` pinned low
(:func:`pin_malloc_threshold`) so freed buffers really return to the OS between calls.
"""

from __future__ import annotations

import gc
import os
import sys


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_TUNED = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 40, top_pad: int = 256 << 20) -> bool:
    """Make glibc keep and reuse freed large buffers instead of unmapping them (Linux / glibc only).

    Buffers up to ``mmap_threshold`` bytes come from the heap, freed memory is returned to the OS only
    beyond ``trim_threshold`` (mallopt takes an int: at most 2 GiB), and the heap grows ``top_pad``
    bytes at a time. Measured on the 2-core project machine (docs/benchmarks.md): RWKV-SAM small's
    image encoder 3.34 -> 2.45 s at 1024 px and 14.8 -> 8.6 s at 2048 px. The cost: the process keeps
    its peak heap resident after the peak. Returns True when applied (also when already applied), False where glibc is not available.
    Process-wide and idempotent; the ``linmix`` CLI calls it unless ``LINMIX_DEFAULT_MALLOC=1``.
    """
    global _TUNED
    if _TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    for value, name in ((mmap_threshold, "mmap_threshold"), (trim_threshold, "trim_threshold"), (top_pad, "top_pad")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer number of bytes, got {value!r}")
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    clamp = (1 << 31) - 1  # mallopt takes an int
    applied = all(
        mallopt(parameter, min(value, clamp)) == 1
        for parameter, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad))
    )
    _TUNED = applied
    return applied


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
