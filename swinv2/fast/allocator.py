"""Process-wide CPU settings that speed the model up without changing a value.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above
its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, so each
large activation of each step is faulted in again page by page, and trims freed memory at the
top of the heap back to the OS. For SwinV2 on a CPU, whose activations are tens to hundreds of
MiB, that is a large share of a step (``benchmarks/`` has the measurements, for timm's SwinV2 as
much as for this one).
:func:`keep_freed_memory` turns both off for the rest of the process, the same effect as
starting it with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>``. The cost: memory freed
by the process is reused by it but not handed back to the OS until it exits (the resident set
stays at its peak), and one large tensor can no longer be served while the heap is too
fragmented, so it is opt-in. Allocators preloaded in place of glibc's (jemalloc, tcmalloc)
cache freed memory themselves; there the call changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


_kept: list[bool] = []


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS
    (large blocks from the heap instead of ``mmap``; no trimming). True where it applied
    (glibc), False elsewhere, where nothing changed."""
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success; a trim threshold of -1 is read as the largest size_t
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok = bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)
    if ok and not _kept:
        _kept.append(True)
    return ok


def is_kept() -> bool:
    """Whether :func:`keep_freed_memory` applied in this process."""
    return bool(_kept)
