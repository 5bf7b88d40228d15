"""The process's memory allocator: glibc malloc told to keep freed memory, or to return it.

Plumbing for entry points (the trainer, the benchmarks), not for the layer.
"""

from __future__ import annotations

import ctypes


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def keep_freed_memory() -> str:
    """Ask glibc malloc to keep freed memory for reuse instead of returning it to the OS.

    NOTE: by default glibc serves blocks over 128 KiB-32 MiB with mmap and
    trims the heap after frees, so a step can map fresh pages and pay a page
    fault per 4 KiB on first touch, a cost that lands in whichever op first
    touches the memory. How much that costs depends on the machine: on one
    of this project's machines (2 gloo ranks) the layer ran at 1.24-1.27 x
    its dense floor with glibc's defaults and 0.97-1.02 with this; on an
    AVX2 EPYC the two were equal within the noise, because the floor pays the
    faults too (BENCHMARKS.md "Allocator"). The trainer calls it unless
    train.keep_freed_memory = false (its default is off under FSDP, whose
    buffers fragment the kept heap: docs/large-models.md); the benchmarks too.
    Any such mallopt also ends glibc's dynamic threshold adjustment for the
    process. Returns what it did, for the log.
    """
    libc = _libc()
    if libc is None:
        return "allocator unchanged (no glibc)"
    if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**30):
        return "glibc malloc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB)"
    return "allocator unchanged (mallopt refused)"


def return_freed_memory() -> bool:
    """The opposite, for measuring memory: every block over 128 KiB is mmapped and unmapped when freed.

    NOTE: a fixed M_MMAP_THRESHOLD also stops glibc from raising it after a
    free (its default, dynamic, would serve later big blocks from the heap,
    which is not returned). Then RSS follows the live tensors, and its peak
    during a step, above its level before, is that step's peak memory.
    malloc_trim(0) hands back what the kept heap holds now.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 65536) and libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    libc.malloc_trim(0)
    return bool(ok)


def trim() -> None:
    """Hand the heap's free memory back to the OS now (malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
