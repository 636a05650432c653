"""Supervision of a site's SuperNode: restart it, with backoff, until the coordinator returns.

Flower's SuperNode retries a lost SuperLink a few times (``--max-retries``), logs
``Giving up reconnection after ...`` and then stays alive doing nothing, so a site whose
coordinator restarted stays offline until someone restarts it by hand. ``fedsafe site start``
watches for that line (or for the SuperNode exiting after it) and starts a fresh SuperNode,
waiting :class:`RestartBackoff` between attempts (2 s, doubling, at most 60 s), saying each
step on the site's output. A SuperNode that exits without giving up (refused by the
coordinator: an unregistered key) is reported as before, not restarted; once restarting, a
fresh SuperNode that cannot join counts as one more failed attempt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fedsafe.transport.processes import (
    SUPERNODE_READY,
    FlowerProcess,
    FlowerProcessError,
)

#: What Flower's SuperNode logs when it stops retrying a lost SuperLink.
GAVE_UP = "Giving up reconnection"


@dataclass(frozen=True, slots=True)
class RestartBackoff:
    """Seconds before each restart attempt: ``first_s * factor**k``, at most ``max_s``.

    Raises
    ------
    ValueError
        If a value is out of range.
    """

    first_s: float = 2.0
    factor: float = 2.0
    max_s: float = 60.0

    def __post_init__(self) -> None:
        if not (self.first_s > 0 and math.isfinite(self.first_s)):
            raise ValueError(f"RestartBackoff.first_s must be > 0, got {self.first_s}")
        if not self.factor >= 1:
            raise ValueError(f"RestartBackoff.factor must be >= 1, got {self.factor}")
        if not (self.max_s >= self.first_s and math.isfinite(self.max_s)):
            raise ValueError(f"RestartBackoff.max_s must be >= first_s, got {self.max_s}")

    def waits(self) -> Iterator[float]:
        """The waits before successive attempts (an endless iterator)."""
        wait = self.first_s
        while True:
            yield wait
            wait = min(wait * self.factor, self.max_s)


def _say(line: str) -> None:
    print(line, flush=True)  # the site's output is often a log file: no buffering


def gave_up(proc: FlowerProcess) -> bool:
    """Whether this start of the SuperNode gave up reconnecting (its log is fresh per start)."""
    return GAVE_UP in proc.log_text()


class SuperNodeSupervisor:
    """Replace a SuperNode that gave up with a fresh one once the coordinator answers.

    Parameters
    ----------
    start
        Starts a SuperNode without waiting (``start_supernode(..., wait_ready=False)``).
    backoff
        Waits between attempts.
    ready_timeout
        Seconds a fresh SuperNode gets to join before it counts as a failed attempt.
    say
        Where status lines go (the site's output).
    sleep
        Sleep (seconds); tests pass their own.
    """

    def __init__(
        self,
        start: Callable[[], FlowerProcess],
        backoff: RestartBackoff | None = None,
        *,
        ready_timeout: float = 60.0,
        say: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.start = start
        self.backoff = backoff or RestartBackoff()
        self.ready_timeout = ready_timeout
        self.say = say or _say
        self.sleep = sleep
        self.restarts = 0

    def __call__(self, proc: FlowerProcess) -> FlowerProcess:
        """Stop ``proc``, then start SuperNodes until one joins; return it."""
        proc.stop()
        self.say(
            f"site: the coordinator is unreachable: the SuperNode gave up reconnecting "
            f"(log {proc.log_path}); restarting it until the coordinator is back"
        )
        for attempt, wait in enumerate(self.backoff.waits(), start=1):
            self.say(f"site: restart attempt {attempt} in {wait:.0f} s")
            self.sleep(wait)
            fresh = self.start()
            try:
                self._wait_joined(fresh)
            except FlowerProcessError:
                fresh.stop()
                continue
            self.restarts += 1
            self.say(f"site: rejoined the coordinator (attempt {attempt}); waiting for rounds")
            return fresh
        raise AssertionError("unreachable: the backoff is endless")

    def _wait_joined(self, proc: FlowerProcess) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            text = proc.log_text()
            if SUPERNODE_READY in text:
                return
            if GAVE_UP in text or not proc.running():
                raise FlowerProcessError(f"{proc.name} could not join")
            time.sleep(0.2)
        raise FlowerProcessError(f"{proc.name} not ready after {self.ready_timeout:.0f}s")
