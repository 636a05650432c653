"""A site's SuperNode with shorter idle and reply polls (flwr 1.42.x only; otherwise unchanged).

Flower 1.42's SuperNode main loop (``flwr.supernode.start_client_internal``) sleeps a
hard-coded 3 s whenever its pull from the SuperLink returns no message, and 0.5 s between
checks for the ClientApp's reply and its objects. On a partner site that is, per message, on
average 1.5 s before the message is even seen and 0.25 s after the reply is ready (BENCHMARKS.md
"Transport: ... deployment against simulation": 2.6 s of a 22 s train phase).

``python -m fedsafe.transport.supernode_polls --idle-seconds S --reply-seconds R -- ARGS``
runs Flower's own ``flower-supernode`` entry point in this process with ``ARGS``, after
replacing the ``time`` module *seen by that one Flower module* with :class:`ShortPolls`,
which turns ``sleep(3)`` into ``sleep(S)`` and ``sleep(0.5)`` into ``sleep(R)`` and passes
every other call through. Nothing else changes: the same TLS, node authentication, node
config, isolation and Runtime API. The adjustment is pinned: it is applied only when
:func:`pinned_flower` finds flwr 1.42.x whose loop module uses ``time`` for exactly those three
sleeps and nothing else (:func:`time_uses`: a patch release that sleeps 3 s elsewhere, say
between reconnections, or reads a clock from ``time``, is left alone); else the SuperNode runs
with Flower's own sleeps and its log says so.

Cost: the idle SuperNode sends one (signed, TLS) ``PullMessages`` request to the SuperLink per
``S`` instead of per 3 s for up to ``--backoff-after-seconds`` (120 s) after its last message,
then per 3 s again until the next one; the reply poll reads the SuperNode's own in-memory state.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

PINNED_MINOR = "1.42."
FLOWER_IDLE_SECONDS = 3.0
FLOWER_REPLY_SECONDS = 0.5
DEFAULT_IDLE_SECONDS = 0.5
DEFAULT_REPLY_SECONDS = 0.05
DEFAULT_BACKOFF_AFTER_SECONDS = 120.0
#: Every use of ``time`` in flwr 1.42.0's SuperNode loop module: the idle sleep after an empty
#: pull and the two reply polls (:func:`time_uses`, sorted).
PINNED_TIME_USES = ("time.sleep(0.5)", "time.sleep(0.5)", "time.sleep(3)")


@dataclass(frozen=True, slots=True)
class ShortPolls:
    """A stand-in for the ``time`` module that shortens Flower's two fixed poll sleeps.

    Parameters
    ----------
    idle_seconds
        Replaces the 3 s sleep after an empty pull from the SuperLink (seconds, > 0).
    reply_seconds
        Replaces the 0.5 s sleep between checks for a ClientApp reply (seconds, > 0).
    backoff_after_seconds
        After this long without a message to answer (seconds, >= 0), idle polls are Flower's
        3 s again, so an idle site between runs costs the coordinator what it did before.

    Raises
    ------
    ValueError
        If a duration is not positive or is longer than Flower's own.
    """

    idle_seconds: float = DEFAULT_IDLE_SECONDS
    reply_seconds: float = DEFAULT_REPLY_SECONDS
    backoff_after_seconds: float = DEFAULT_BACKOFF_AFTER_SECONDS
    _idle_since: list[float] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.idle_seconds <= FLOWER_IDLE_SECONDS:
            raise ValueError(f"idle_seconds must be in (0, 3], got {self.idle_seconds}")
        if not 0 < self.reply_seconds <= FLOWER_REPLY_SECONDS:
            raise ValueError(f"reply_seconds must be in (0, 0.5], got {self.reply_seconds}")
        if not self.backoff_after_seconds >= 0:
            raise ValueError(
                f"backoff_after_seconds must be >= 0, got {self.backoff_after_seconds}"
            )

    def duration(self, seconds: float, now: float | None = None) -> float:
        """How long :meth:`sleep` sleeps when Flower asks for ``seconds``.

        An idle sleep is short until the SuperNode has been idle (no reply polled) for
        ``backoff_after_seconds``; then it is Flower's own 3 s again, until the next message.
        ``now`` is ``time.monotonic()`` in seconds (given in tests).
        """
        now = time.monotonic() if now is None else now
        if seconds == FLOWER_IDLE_SECONDS:
            if not self._idle_since:
                self._idle_since.append(now)
            if now - self._idle_since[0] >= self.backoff_after_seconds:
                return FLOWER_IDLE_SECONDS
            return self.idle_seconds
        if seconds == FLOWER_REPLY_SECONDS:
            self._idle_since.clear()  # a message is being answered: the site is busy
            return self.reply_seconds
        return seconds

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` with Flower's two fixed poll intervals shortened."""
        time.sleep(self.duration(seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def time_uses(source: str) -> list[str]:
    """Every use of the name ``time``'s attributes in ``source``, as code, sorted.

    A call is written whole (``time.sleep(3)``), any other use as the attribute
    (``time.monotonic``), so a changed argument or a new clock read shows.
    """
    tree = ast.parse(source)
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    uses = [
        ast.unparse(calls.get(id(node), node))
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "time"
    ]
    return sorted(uses)


def pinned_flower() -> ModuleType | None:
    """Flower's SuperNode loop module if this is the version the adjustment was checked on.

    flwr 1.42.x whose loop module uses ``time`` exactly as :data:`PINNED_TIME_USES` says;
    None otherwise.
    """
    import flwr
    from flwr.supernode import start_client_internal

    if not str(flwr.__version__).startswith(PINNED_MINOR):
        return None
    if tuple(time_uses(inspect.getsource(start_client_internal))) != PINNED_TIME_USES:
        return None
    return start_client_internal


def apply(polls: ShortPolls) -> bool:
    """Install ``polls`` as the ``time`` of Flower's SuperNode loop; False if not pinned."""
    module = pinned_flower()
    if module is None:
        return False
    module.time = polls  # type: ignore[attr-defined]
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``--idle-seconds S --reply-seconds R -- <flower-supernode arguments>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, flower_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS)
    parser.add_argument("--reply-seconds", type=float, default=DEFAULT_REPLY_SECONDS)
    parser.add_argument(
        "--backoff-after-seconds", type=float, default=DEFAULT_BACKOFF_AFTER_SECONDS
    )
    args = parser.parse_args(ours)
    polls = ShortPolls(args.idle_seconds, args.reply_seconds, args.backoff_after_seconds)
    if apply(polls):
        print(
            f"fedsafe: SuperNode polls shortened (idle {polls.idle_seconds} s, reply "
            f"{polls.reply_seconds} s; flwr 1.42)",
            flush=True,
        )
    else:
        print("fedsafe: SuperNode polls unchanged (not flwr 1.42.x)", flush=True)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
