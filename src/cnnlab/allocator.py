"""Keep the memory a training step frees, so the next step reuses it instead of faulting it back in.

Every training step allocates and frees the same activation tensors. glibc's malloc hands blocks
above its mmap threshold (128 KiB at first, at most 32 MiB) straight back to the kernel when they
are freed, and trims the top of its heap, so each step page-faults its activations in again: the
kernel traps on every 4 KiB page and zeroes it before the step may write it. On the 2-core host
this was 1,700-1,950 page faults and 3-6 ms of kernel time per `mnist_tiny` step (about a tenth of
the step's CPU time), and ~10% kernel time in the ResNet recipes. With every block served from
malloc's heaps and nothing trimmed, the faults stop after the first steps (BENCHMARKS.md,
"Page faults").

The setting is process-wide (malloc has one configuration) and only changes when memory goes back to
the kernel: a training process keeps its peak footprint until it exits.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h: free heap top kept before trimming
M_MMAP_MAX = -4  # glibc's malloc.h: most blocks served by mmap at once (0: none)
INT_MAX = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve every block from its heaps and never trim them; False where the C
    library is not glibc (macOS, musl, Windows), which keeps its own policy."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others name their C library differently
        return False
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, INT_MAX))
