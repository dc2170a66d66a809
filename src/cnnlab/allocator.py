"""Keep the memory a training step frees, so the next step reuses it instead of faulting it back in.

Every training step allocates and frees the same activation tensors. glibc's malloc hands blocks
above its mmap threshold (128 KiB at first, at most 32 MiB) straight back to the kernel when they
are freed, and trims the top of its heap, so each step page-faults its activations in again: the
kernel traps on every 4 KiB page and zeroes it before the step may write it. On the 2-core host
that was ~1,500-1,950 page faults and 3-6 ms of kernel time per `mnist_tiny` step and ~4,400 and
9 ms per `cifar_dw56k` step; with this setting the steps ran 1.13x and 1.32x faster, a ResNet's
1.00x (BENCHMARKS.md, "Page faults").

``keep_freed_memory`` sets ``M_MMAP_MAX = 0`` (blocks come from malloc's heaps, not from their own
mmap) and ``M_TRIM_THRESHOLD`` to its largest value (the heaps are not trimmed). What that costs:
the setting is process-wide (malloc has one configuration) and a process keeps its peak footprint,
and the free holes inside its heap, until it trims (a ResNet run: 1.8-2.4 GB resident against 1.4).

``give_back_freed_memory`` trims (``malloc_trim``: every free page goes back to the kernel), and
training calls it once per epoch, after evaluation and before the checkpoint is written (so the
checkpoint's serialisation buffers stay resident until the next trim). Untrimmed, a 50-epoch
``mnist_tiny`` run on 256 images held 158 MiB and was resident at 448-460 MiB after epoch 1, then
471-494 MiB: at a random epoch (as late as the 13th) a block fitted none of the holes and the heap
grew. Trimmed each epoch it stayed at 374-375 MiB from epoch 1 to 50 in every run. A trim took
4-18 ms there, and the next step faults its pages in once.

glibc still maps a block of its own where a heap cannot hold it (beyond a thread heap's 64 MiB, or
when the main heap cannot grow), so large requests do not fail. Other C libraries (macOS, musl)
and a preloaded jemalloc or tcmalloc keep their own policy.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h: free heap top kept before trimming
M_MMAP_MAX = -4  # glibc's malloc.h: most blocks served by mmap at once (0: none)
INT_MAX = 2**31 - 1  # mallopt takes an int


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others name their C library differently
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve blocks from its heaps and never trim them; False where the C
    library is not glibc, which keeps its own policy."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, INT_MAX))


def give_back_freed_memory() -> None:
    """Return the free pages of glibc's heaps to the kernel (no-op on other C libraries): between
    epochs, so resident memory follows what the process holds rather than its peak and holes."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
