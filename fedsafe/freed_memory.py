"""Hand freed heap memory back to the operating system after a one-off large computation.

The processes that run simulated sites start with glibc settings that keep freed memory
(:data:`fedsafe.training.malloc_tuning.KEEP_FREED_MEMORY_ENV`: no ``mmap`` allocations, no
automatic heap trimming), so that DP-SGD's per-step buffers are reused instead of re-faulted.
The price is that a one-off peak stays resident for the life of the process: a Ray worker that
once calibrated a noise multiplier (a PRV composition over millions of grid points, about
1.3 GB of temporaries) or loaded MNIST (float32 copies of the whole training set) kept that
memory through every later round (issue 17, BENCHMARKS.md "Peak memory of the 10-site MNIST
simulation").

:func:`return_freed_memory` calls glibc's ``malloc_trim(0)`` at such points: the top of the
heap is returned and, since glibc 2.8, every whole free page inside it is released with
``madvise(MADV_DONTNEED)``. It frees nothing that is in use and changes no computed value;
the settings stay on, so a training loop that follows still reuses its buffers after its
first step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

_trim: list[Callable[[int], int] | None] = []


def _malloc_trim() -> Callable[[int], int] | None:
    if not _trim:
        function = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                function = libc.malloc_trim
                function.argtypes = [ctypes.c_size_t]
                function.restype = ctypes.c_int
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                function = None
        _trim.append(function)
    return _trim[0]


def return_freed_memory() -> bool:
    """Return the heap's free pages to the operating system (glibc ``malloc_trim(0)``).

    Returns
    -------
    bool
        True if glibc released any memory; False if there was none to release or the C
        library is not glibc (nothing happens then).
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
