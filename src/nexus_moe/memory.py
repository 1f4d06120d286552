"""Process memory settings for the commands that stream models (docs/design.md §5).

glibc's malloc serves a large block (128 KiB and up) with its own mapping, given back to the
system when freed, but each time such a block is freed it raises that threshold to the block's
size, so the next forward pass's buffers come from the heap, which keeps its high-water mark.
Streamed upcycling frees and allocates such buffers block after block; with the moving threshold
its peak varied between runs of the same command by ~180 MiB (BENCHMARKS.md, "Upcycling peak
memory"). A fixed threshold keeps it at the low end, for some more page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
THRESHOLD = 128 * 1024  # glibc's own default, held fixed


def fix_mmap_threshold() -> bool:
    """Hold glibc's mmap threshold at its default (:data:`THRESHOLD`) for this process, so freed
    large buffers go back to the system; True when set. Nothing is done (False) off glibc, or
    when the user set ``MALLOC_MMAP_THRESHOLD_`` themselves."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD))
