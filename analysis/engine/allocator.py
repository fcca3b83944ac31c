"""Keep freed activation memory in the process instead of handing it back to the OS.

A sweep runs the same shapes batch after batch. glibc's malloc serves big blocks with mmap
and returns them on free (and trims the heap top past 128 KiB), so every batch page-faults
its intermediate values back in. ``benchmarks/allocator.py`` measures it side by side: on
the 2-core machines here, a MiniLM FP32 forward keeping its values took 1.38 s vs 1.21 s,
and a chunk of 12 layer jobs 5.53 s vs 3.86 s (x1.43). Only sweep processes opt in: the
CLI's ``analyze`` and ``demo`` and the pool workers, not a library caller's process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit: larger blocks are always mmapped
TRIM_THRESHOLD = 2**31 - 1  # the largest value the int parameter takes


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for repeated same-shape batches; False (and nothing changed) elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
