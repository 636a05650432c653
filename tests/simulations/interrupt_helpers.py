"""Start a CLI process that Ctrl-C (SIGINT) can reach, whatever this test process inherited."""

from __future__ import annotations

import signal
from pathlib import Path


def default_sigint() -> None:
    """``preexec_fn``: SIGINT unblocked and at its default, so Python installs its handler.

    An ignored or blocked signal survives ``exec``: a test process that inherited SIGINT
    ignored (a background job of a non-interactive shell) or blocked would start a CLI that
    never sees the test's SIGINT.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_state(pid: int | str = "self") -> str:
    """The blocked, ignored and caught signal masks of a process, for a failure message."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"/proc/{pid}/status: {exc}"
    return " ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
