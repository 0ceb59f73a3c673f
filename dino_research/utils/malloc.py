"""Keep freed memory mapped in glibc's allocator, so CPU training steps do not page-fault it back.

A training step frees and allocates again the same activation buffers every iteration. glibc's
defaults give the kernel back any freed block above its mmap threshold (which adapts up to 32 MiB)
and any free heap top above 128 KiB, so the next step faults the same pages in again: on a 2-core
machine the ViT-S/16 float32 step of ``tools/bench_training.py`` took a median 8.80 s (steps of 7.9
to 11.6 s) with glibc's defaults, 7.73 s (6.9 to 8.4 s) with ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824`` in the environment, and 7.94 s with
the same settings applied at run time through ``mallopt`` by this module (the trim threshold capped
at 2 GiB, the largest value mallopt takes). The cost: the process keeps its peak heap
resident (plus up to ``top_pad`` of address space) instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger("dino_research")

# mallopt parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2), and the largest int
# mallopt takes (its value is a C int).
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
INT_MAX = 2**31 - 1
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory_mapped(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = INT_MAX,
                             top_pad: int = 1024**3) -> bool:
    """Set glibc's mmap threshold, trim threshold and top pad (bytes) for this process and the
    processes it forks; True when all three were set.

    Does nothing (False) off Linux, with a C library other than glibc, or when any ``MALLOC_*_``
    variable of ``ENV_VARS`` is set: the user's own choice wins.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in ENV_VARS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {M_MMAP_THRESHOLD: mmap_threshold, M_TRIM_THRESHOLD: trim_threshold, M_TOP_PAD: top_pad}
    return all(mallopt(param, min(value, INT_MAX)) == 1 for param, value in settings.items())
