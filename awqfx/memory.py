"""Returning freed memory to the operating system between stages, and the peak a run reached."""
from __future__ import annotations

import ctypes
import gc

try:
    import resource
except ImportError:  # not POSIX (Windows): no peak-RSS figure
    resource = None

__all__ = ["release_memory", "peak_rss_mb", "map_large_allocations"]

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB (Linux reports KiB), None where unknown."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    A forward over [8, 512] tokens leaves ~1 GB of freed-but-cached blocks in glibc's heap (its
    mmap threshold grows with the first large frees); trimming between stages keeps the peak RSS of
    the whole pass at the largest stage instead of their sum. A no-op where glibc is absent.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def map_large_allocations(threshold: int = 2**20) -> None:
    """Serve every allocation of ``threshold`` bytes or more from its own memory mapping, returned to
    the OS the moment it is freed (glibc ``mallopt(M_MMAP_THRESHOLD)``; process-wide, a no-op where
    glibc is absent).

    glibc raises its mapping threshold to the size of each large block freed (up to 32 MiB), after
    which blocks of that size come from the heap and their freed pages stay resident: the search
    of one TinyLlama layer then peaks ~190 MB higher, on freed candidate weights and activations
    left in the heap. A fixed threshold keeps the resident size at what is live, for the price of a
    page fault per 4 KiB of each large tensor (milliseconds against seconds of matmuls per candidate).
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold))
    except (OSError, AttributeError):
        pass
