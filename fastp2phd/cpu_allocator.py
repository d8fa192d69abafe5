"""Keeping freed memory for reuse, so large CPU tensors do not page-fault on every call.

glibc's malloc hands every block above its mmap threshold (which adapts up to 32 MiB) straight back to
the system on free, and the next allocation of that size faults in every page again. pix2pixHD's large
activations are far above it (the first layers at 512x1024 hold 64 x 512 x 1024 floats, 128 MiB), so
on the CPU each layer paid for page faults as much as for its arithmetic: the 512p generator took 18-27%
less time at 512x1024 and 256x512 with freed blocks kept (2-core Xeon), and the fused IN+act forward
at 1x64x512x1024 took 19 ms instead of 44.

The cost is that the process keeps its peak memory until it exits, which suits the ``fastp2phd``
commands (they call ``keep_freed_memory`` first) but is a choice for a library user to make: call it
at the start of a program that runs pix2pixHD on the CPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
_LARGEST = 2**31 - 1  # mallopt takes an int


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    """The C library when it is glibc, else None (looked up once: heap_bytes_in_use is sampled every ms)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = _MallInfo2
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks of any size for reuse instead of returning them to the system.

    Returns whether it took effect: only on Linux with glibc (elsewhere, nothing changes).
    """
    libc = _glibc()
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _LARGEST),  # large blocks come from the heap, so free() keeps them there
        (_M_TRIM_THRESHOLD, _LARGEST),  # and the heap's top is not handed back either
        (_M_TOP_PAD, 64 << 20),  # grow the heap in steps of 64 MiB rather than page by page
    ))


def heap_bytes_in_use() -> int | None:
    """Bytes that malloc has handed out and not yet been given back (glibc's mallinfo2, all arenas), or None
    without glibc 2.33+. Unlike resident memory it is the same whether freed memory is kept or not, so it
    measures what a call allocates (CPU tensors come from malloc) while ``keep_freed_memory`` is on."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd  # in use from the heaps + in blocks mmapped on their own
