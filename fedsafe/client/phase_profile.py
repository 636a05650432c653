"""Opt-in, site-local profile of where a ClientApp handler's time goes (issue 17).

With ``FEDSAFE_PROFILE_DIR`` set in the site's environment, every handler of fedsafe's ClientApp
appends one JSON line to ``<dir>/site-profile-<pid>.jsonl``: the message kind, the site's
partition (simulated) or name, the round, the handler's wall time and start (epoch seconds,
to line handlers up with the coordinator's phases), and the *exclusive* seconds
of each site mod and of the handler itself (a mod's time without the mods inside it), plus any
named :func:`phase` inside them (``calibration``, ``site-data``, ``warm-up``), which is then
subtracted from the mod around it. Process facts are recorded with each line: CPU seconds the
process had used before the handler (imports and earlier work), whether Opacus was already
imported, and the handler's index in the process (0 = the first message this worker saw).

Nothing of it leaves the site: the file is written on the site's own disk, holds timings and
the site's own name only (no record values, no counts), and is never part of a reply. Without
the variable the profile costs one dictionary lookup per handler.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

#: The environment variable naming the folder the profile lines are written to.
PROFILE_DIR_ENV = "FEDSAFE_PROFILE_DIR"

_local = threading.local()
# A child of Flower's logger: the site's own log, never a reply.
log = logging.getLogger("flwr.fedsafe.client")
_handlers_seen = [0]


def profile_dir() -> Path | None:
    """The folder profiles go to, or None when profiling is off."""
    value = os.environ.get(PROFILE_DIR_ENV, "")
    return Path(value) if value else None


class _Frame:
    """One timed span: its start, and the seconds spent in spans nested inside it."""

    __slots__ = ("child", "name", "start")

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.perf_counter()
        self.child = 0.0


def _stack() -> list[_Frame] | None:
    return getattr(_local, "stack", None)


def _close(frame: _Frame) -> None:
    stack = _stack()
    if stack is None:
        return
    elapsed = time.perf_counter() - frame.start
    stack.pop()
    phases: dict[str, float] = _local.phases
    phases[frame.name] = phases.get(frame.name, 0.0) + elapsed - frame.child
    if stack:
        stack[-1].child += elapsed


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a named part of a handler (exclusive of named parts inside it); no-op when off."""
    stack = _stack()
    if stack is None:
        yield
        return
    frame = _Frame(name)
    stack.append(frame)
    try:
        yield
    finally:
        _close(frame)


def _site_label(context: Context) -> str:
    nc = context.node_config
    for key in ("partition-id", "site-name"):
        if key in nc:
            return str(nc[key])
    return ""


def _round_of(msg: Message) -> int | str:
    config = msg.content.config_records.get("config")
    value = config.get("server-round") if config is not None else None
    return int(value) if isinstance(value, int) else msg.metadata.group_id


def _write(folder: Path, line: dict[str, object]) -> None:
    """Append the line; a profile that cannot be written is dropped, never the reply.

    It runs outside the site's error mod, so an exception here would reach the coordinator
    as an undeclared error text: the folder's problem is logged at the site only.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"site-profile-{os.getpid()}.jsonl", "a", encoding="utf-8") as out:
            out.write(json.dumps(line, sort_keys=True) + "\n")
    except OSError as exc:
        log.warning("fedsafe: site profile not written to %s (%s)", folder, exc.strerror)


def _begin() -> tuple[int, float, bool]:
    """Open a handler's profile; its index in the process, CPU seconds so far, Opacus loaded."""
    index = _handlers_seen[0]
    _handlers_seen[0] += 1
    _local.stack, _local.phases = [], {}
    return index, time.process_time(), "opacus" in sys.modules


def _end() -> dict[str, float]:
    """Close the handler's profile and return its exclusive seconds per phase."""
    phases: dict[str, float] = dict(_local.phases)
    del _local.stack, _local.phases
    return phases


class _Outermost:
    """The outermost mod, profiled: opens the handler's profile and writes its line.

    A class at module level, not a closure: Flower's Ray backend pickles the ClientApp with
    every message, and a closure would carry copies of this module's state.
    """

    def __init__(self, mod: Mod, name: str, last: bool) -> None:
        self.mod, self.name, self.last = mod, name, last

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        folder = profile_dir()
        if folder is None or _stack() is not None:
            return self.mod(msg, context, call_next)
        index, cpu_before, opacus_before = _begin()
        started, started_at = time.perf_counter(), time.time()
        try:
            with phase(f"mod:{self.name}"):
                return self.mod(msg, context, _TimedHandler(call_next) if self.last else call_next)
        finally:
            wall = time.perf_counter() - started
            phases = _end()
            _write(
                folder,
                {
                    "pid": os.getpid(),
                    "kind": msg.metadata.message_type,
                    "site": _site_label(context),
                    "round": _round_of(msg),
                    "handler_index": index,
                    "process_cpu_before_s": round(cpu_before, 4),
                    "opacus_imported_before": opacus_before,
                    "wall_s": round(wall, 4),
                    "started_at": round(started_at, 4),
                    "phases": {k: round(v, 4) for k, v in sorted(phases.items())},
                },
            )


class _TimedHandler:
    """The handler behind the innermost mod, timed as ``handler:<kind>``."""

    def __init__(self, call_next: ClientAppCallable) -> None:
        self.call_next = call_next

    def __call__(self, msg: Message, context: Context) -> Message:
        with phase(f"handler:{msg.metadata.message_type}"):
            return self.call_next(msg, context)


class _Inner:
    """A mod inside the outermost one, profiled as ``mod:<name>`` (and the handler, if last)."""

    def __init__(self, mod: Mod, name: str, last: bool) -> None:
        self.mod, self.name, self.last = mod, name, last

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if _stack() is None:
            return self.mod(msg, context, call_next)
        inner = _TimedHandler(call_next) if self.last else call_next
        with phase(f"mod:{self.name}"):
            return self.mod(msg, context, inner)


def profiled(mods: list[Mod]) -> list[Mod]:
    """``mods`` wrapped so that, with :data:`PROFILE_DIR_ENV` set, each handler is profiled.

    Parameters
    ----------
    mods
        A ClientApp's mods, outermost first (non-empty).

    Returns
    -------
    list of Mod
        The same mods in the same order; each one passes messages through unchanged and, when
        profiling is on, times its own part. The outermost writes the handler's line.

    Raises
    ------
    ValueError
        If ``mods`` is empty (there is no handler boundary to time).
    """
    if not mods:
        raise ValueError("profiled() needs at least one mod")
    names = [getattr(m, "__name__", type(m).__name__) for m in mods]
    last = len(mods) - 1
    return [_Outermost(mods[0], names[0], last=last == 0)] + [
        _Inner(mods[i], names[i], last=i == last) for i in range(1, len(mods))
    ]
