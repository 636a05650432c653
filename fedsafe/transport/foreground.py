"""Keep a Flower process in the foreground of a ``fedsafe`` command and stop it on exit.

``fedsafe coordinator start`` and ``fedsafe site start`` are long-running services (run
them under systemd or in a terminal). SIGTERM and Ctrl-C both stop the Flower process tree
they started, so no SuperLink or SuperNode outlives the command.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from fedsafe.transport.processes import FlowerProcess


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def run_in_foreground(
    proc: FlowerProcess,
    *,
    echo_log: bool = True,
    companions: Sequence[FlowerProcess] = (),
    on_exit: Callable[[FlowerProcess], None] | None = None,
    alerts: Sequence[tuple[FlowerProcess, str]] = (),
    restart: Callable[[FlowerProcess], FlowerProcess] | None = None,
    needs_restart: Callable[[FlowerProcess], bool] | None = None,
) -> int:
    """Follow ``proc``'s log on stdout until it exits or this command is stopped.

    ``companions`` (e.g. the Fleet proxy next to the SuperLink) are watched too: if one
    exits, everything stops; all are stopped on the way out. ``on_exit`` is called with the
    process that exited on its own (to print why), not when the command was stopped.
    ``alerts``: (process, marker) pairs; every new line of that process's log holding the
    marker is printed even without ``echo_log`` (e.g. the launcher's refusals).
    ``restart``: when ``needs_restart(proc)`` holds (e.g. the SuperNode gave up reconnecting),
    ``proc`` is replaced by ``restart(proc)`` (which stops it and starts another) and followed
    on (:mod:`fedsafe.transport.supervision`).

    Returns
    -------
    int
        The exit code of the process that exited (1 if it exited with 0 while a service
        was expected to keep running), or 0 when stopped by SIGTERM or Ctrl-C.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    offset = 0
    alert_offsets = [0 for _ in alerts]  # logs are fresh per start (spawn fresh_log)
    try:
        while True:
            for i, (source, marker) in enumerate(alerts):
                text = source.log_text()
                for line in text[alert_offsets[i] :].splitlines(keepends=True):
                    if line.endswith("\n"):
                        alert_offsets[i] += len(line)
                        if marker in line:
                            print(line.rstrip(), flush=True)
            if echo_log:
                text = proc.log_text()
                if len(text) > offset:
                    sys.stdout.write(text[offset:])
                    sys.stdout.flush()
                    offset = len(text)
            if restart is not None and needs_restart is not None and needs_restart(proc):
                proc = restart(proc)
                offset = 0
                continue
            for watched in (proc, *companions):
                if not watched.running():
                    if on_exit is not None:
                        on_exit(watched)
                    return int(watched.popen.returncode or 0) or 1
            time.sleep(0.5)
    except (KeyboardInterrupt, _Terminated):
        print(f"\nstopping {proc.name} (pid {proc.pid})", file=sys.stderr)
        return 0
    finally:
        # A second SIGTERM or Ctrl-C while stopping (systemd, `kill` twice) must not abort
        # the stop half-way with a traceback; the stop itself ends in SIGKILL after a timeout.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for other in companions:
                other.stop()
            proc.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
