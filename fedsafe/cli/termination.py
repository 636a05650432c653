"""SIGTERM stops a ``fedsafe`` command the way Ctrl-C does, so its clean-up runs.

Without a handler, SIGTERM (``kill``, a job scheduler's stop, a CI timeout) ends Python at
once: ``fedsafe simulate`` then left its SuperLink, SuperExec, ``flwr run`` and
``flwr-simulation`` running (attack 17d). Inside :func:`sigterm_as_interrupt` the signal raises
:class:`Terminated`, a :class:`KeyboardInterrupt`, so every ``with`` and ``finally`` that
handles Ctrl-C stops what it started; the command exits with 143 (128 + SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["TERMINATED_EXIT", "Terminated", "sigterm_as_interrupt"]

TERMINATED_EXIT = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the command receives SIGTERM."""


def _raise_once(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM while the clean-up runs must not abort it half-way.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (once; later ones are ignored).

    Outside the main thread (where Python cannot install handlers) the block runs unchanged.
    The previous handler is restored when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_once)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
