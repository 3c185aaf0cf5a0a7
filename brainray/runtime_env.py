"""Process settings for fast CPU training and inference: glibc's allocator.

Activations of a 32-image batch at 224 px are hundreds of MB per tensor. glibc serves anything
over 32 MB with a fresh mmap and returns it on free, so every training step page-faults and
zero-fills gigabytes: about 30% of a paper_cnn step on 2 cores (bench/compute.py). Keeping large
blocks in the heap and never trimming it removes that cost. Ray Train runs the training loop in a
thread, and glibc gives threads their own arenas (capped at 64 MB a heap, so large blocks are
mmapped anyway), hence a single arena too. Peak resident memory is unchanged: freed blocks are
reused, not returned.

These are read once at process start, so Ray workers get them through the job's runtime
environment; `tune_this_process` applies what can still be applied to a running main thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_MMAP_THRESHOLD = 2**31 - 1  # the largest value glibc's int parameter takes
_TRIM_THRESHOLD = 2**31 - 1
# glibc's classic variables rather than GLIBC_TUNABLES: Ray's runtime_env cuts env values at ":".
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD),
                 "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def worker_env_vars() -> dict[str, str]:
    """Environment variables for the job's Ray workers; a user's own allocator settings win."""
    if any(name in os.environ for name in (*ALLOCATOR_ENV, "GLIBC_TUNABLES")):
        return {}
    return dict(ALLOCATOR_ENV)


def tune_this_process() -> bool:
    """Apply the thresholds to this process (its main thread's arena). False where there is no
    glibc (macOS, musl): those allocators do not have this problem to the same degree."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
