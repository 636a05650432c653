"""Keep freed memory in the process, so DP-SGD's large per-step buffers are not re-faulted.

Opacus builds per-record gradients (``batch x parameters`` floats, hundreds of MB for a
4x512 MLP at batch 256) and frees them every step. glibc's ``malloc`` serves blocks above its
``mmap`` threshold (128 KiB, adapting up to 32 MiB) with fresh ``mmap`` pages and returns them
with ``munmap`` on ``free``: every step then pays one page fault per 4 KiB page touched (the
issue measured 287,750 per step, 480 ms of a 621 ms step). With ``mmap`` off and trimming off
(``mallopt``, glibc only), freed blocks stay in the heap and the next step reuses the same,
already-mapped pages. The cost: the process keeps its peak heap until it exits, which a
ClientApp process (one message) or a bench does anyway; a long-lived simulation worker would
keep one-off peaks for every later round, so fedsafe hands those back where they happen
(:func:`fedsafe.freed_memory.return_freed_memory` after a large PRV evaluation and after
MNIST's load; issue 17).

Two ways in: :data:`KEEP_FREED_MEMORY_ENV` in the environment of a process started for
ClientApps (glibc reads it before the first allocation: the full effect, about 36,000 faults per
hooks-mode step of a 512-wide layer at batch 64 down to 0 in
``tests/client/test_malloc_tuning.py``), and :func:`keep_freed_memory` at the
start of training in a process started without it (``mallopt`` after start-up: a partial
effect, since the heap already interleaves with mappings made during imports: 0 to 1/3 of
the default faults in that test).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Final

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_MAX: Final = -4
_INT_MAX: Final = 2**31 - 1
_applied: list[bool] = []

KEEP_FREED_MEMORY_ENV: Final = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX),
}
"""glibc's environment names for the same two settings, for processes that run ClientApps."""


def keep_freed_memory() -> bool:
    """Turn glibc's ``mmap`` allocations and heap trimming off in this process, once.

    Returns
    -------
    bool
        True if glibc accepted both settings (now or at an earlier call); False on other C
        libraries or platforms, where nothing changes.
    """
    if _applied:
        return _applied[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    _applied.append(ok)
    return ok
