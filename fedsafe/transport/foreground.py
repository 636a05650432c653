"""Keep a Flower process in the foreground of a ``fedsafe`` command and stop it on exit.

``fedsafe coordinator start`` and ``fedsafe site start`` are long-running services (run
them under systemd or in a terminal). SIGTERM and Ctrl-C both stop the Flower process tree
they started, so no SuperLink or SuperNode outlives the command.
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

from fedsafe.transport.processes import FlowerProcess


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def run_in_foreground(proc: FlowerProcess, *, echo_log: bool = True) -> int:
    """Follow ``proc``'s log on stdout until it exits or this command is stopped.

    Returns
    -------
    int
        The process's exit code, or 0 when stopped by SIGTERM or Ctrl-C.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    offset = 0
    try:
        while True:
            if echo_log:
                text = proc.log_text()
                if len(text) > offset:
                    sys.stdout.write(text[offset:])
                    sys.stdout.flush()
                    offset = len(text)
            if not proc.running():
                return int(proc.popen.returncode or 0)
            time.sleep(0.5)
    except (KeyboardInterrupt, _Terminated):
        print(f"\nstopping {proc.name} (pid {proc.pid})", file=sys.stderr)
        return 0
    finally:
        proc.stop()
        signal.signal(signal.SIGTERM, previous)
