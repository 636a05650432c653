"""Where a deployment round's time goes, read from the SuperNodes' debug logs.

On Flower's deployment engine a message to a site takes this path (Flower 1.41, ``subprocess``
isolation; the ``process`` isolation only moves the launcher out of the SuperNode, the ClientApp
is still one process per message, started with a one-time token):

1. the ServerApp pushes it to the SuperLink;
2. the site's SuperNode pulls it (the SuperNode polls, sleeping 3 s when nothing is waiting);
3. the SuperExec inside the SuperNode claims the task (it polls every second) and starts a
   fresh ``flwr-clientapp`` process, which imports Flower;
4. that process installs the FAB and loads fedsafe's ClientApp (importing torch and Opacus);
5. the ClientApp handles the message (data, DP-SGD, ledger, encoding);
6. the reply goes back to the SuperNode, which pushes it to the SuperLink;
7. the ServerApp pulls the replies (fedsafe polls on :class:`fedsafe.server.grid.PollBackoff`).

With ``FLWR_LOG_LEVEL=DEBUG`` every Flower process on the site writes timestamped lines for
these steps into the SuperNode's log, and fedsafe's ClientApp adds ``fedsafe: <type> handler
start|end`` lines. :func:`site_episodes` turns one log into one :class:`Episode` per message;
:func:`phase_breakdown` lines them up with the coordinator's send and receive times (from
``rounds.jsonl``) and splits a phase's wall time along its critical path (the site whose reply
came last). All processes run on one machine in the benchmark, so their clocks agree.

Debug logs name message ids and paths: use them for measurement, never in production (Flower
says so in the log itself).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STAMP = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_RECEIVING = re.compile(r"Receiving: (\w+) message")
_SENDING = re.compile(r"Sending: (\w+) message")
_HANDLER = re.compile(r"fedsafe: (\w+) handler (start|end)")
#: What a task process of fedsafe's launcher logs first (``approved_clientapp.mark_start``).
_LAUNCHED = "fedsafe-launcher: task process started"

#: Steps of one message at a site, in order; each is the time since the step before.
STEPS = (
    "node_poll",  # coordinator sent -> SuperNode received
    "process_start",  # received -> flwr-clientapp process started (SuperExec poll + spawn)
    "app_load",  # process started -> fedsafe handler entered (FAB install, torch/Opacus import)
    "compute",  # handler start -> handler end (data, DP-SGD, ledger, encoding)
    "reply_handoff",  # handler end -> SuperNode starts sending (process exit, 0.5 s poll)
    "upload",  # SuperNode sending -> sent
    "server_poll",  # last site sent -> coordinator has every reply
)


def _stamp(line: str) -> float | None:
    match = _STAMP.match(line)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Episode:
    """Timestamps (epoch seconds) of one message handled by one site; None if not logged."""

    kind: str
    received: float
    process_start: float | None = None
    handler_start: float | None = None
    handler_end: float | None = None
    sending: float | None = None
    sent: float | None = None

    @property
    def complete(self) -> bool:
        """True when every step was logged."""
        return None not in (
            self.process_start,
            self.handler_start,
            self.handler_end,
            self.sending,
            self.sent,
        )


def site_episodes(log_text: str) -> list[Episode]:
    """One :class:`Episode` per message a SuperNode received, from its debug log.

    Parameters
    ----------
    log_text
        The SuperNode's combined output with ``FLWR_LOG_LEVEL=DEBUG`` (the ClientApp processes
        it starts write into the same stream).
    """
    episodes: list[Episode] = []
    for raw in log_text.splitlines():
        line = _ANSI.sub("", raw)
        stamp = _stamp(line)
        if stamp is None:
            continue
        if match := _RECEIVING.search(line):
            episodes.append(Episode(kind=match.group(1), received=stamp))
            continue
        if not episodes:
            continue
        current = episodes[-1]
        if current.process_start is None and (
            "Start `flwr-clientapp` process" in line or _LAUNCHED in line
        ):
            current.process_start = stamp
        elif match := _HANDLER.search(line):
            if match.group(2) == "start" and current.handler_start is None:
                current.handler_start = stamp
            elif match.group(2) == "end":
                current.handler_end = stamp
        elif (match := _SENDING.search(line)) and current.sending is None:
            current.sending = stamp
        elif "Sent successfully" in line and current.sending is not None and current.sent is None:
            current.sent = stamp
    return episodes


@dataclass
class PhaseBreakdown:
    """One phase (train or evaluate) of one round, split along its critical path."""

    kind: str
    round: int
    wall_s: float
    steps_s: dict[str, float] = field(default_factory=dict)
    critical_site: str = ""


def phase_breakdown(
    kind: str,
    rnd: int,
    sent_at: float,
    done_at: float,
    episodes: dict[str, list[Episode]],
) -> PhaseBreakdown | None:
    """Split one phase's wall time into :data:`STEPS` along the slowest site's path.

    Parameters
    ----------
    kind
        ``"train"`` or ``"evaluate"``.
    rnd
        The round number (for the record).
    sent_at, done_at
        When the coordinator pushed the phase's messages and when it held every reply.
    episodes
        Every site's episodes (from :func:`site_episodes`), by site name.

    Returns
    -------
    PhaseBreakdown or None
        None when some site has no complete episode of ``kind`` inside the phase.
    """
    chosen: dict[str, Episode] = {}
    for site, items in episodes.items():
        inside = [e for e in items if e.kind == kind and sent_at - 0.5 <= e.received <= done_at]
        if not inside or not inside[0].complete:
            return None
        chosen[site] = inside[0]
    if not chosen:
        return None
    site, last = max(chosen.items(), key=lambda item: item[1].sent or 0.0)
    assert last.process_start and last.handler_start and last.handler_end
    assert last.sending and last.sent
    marks = [
        sent_at,
        last.received,
        last.process_start,
        last.handler_start,
        last.handler_end,
        last.sending,
        last.sent,
        done_at,
    ]
    steps = {name: marks[i + 1] - marks[i] for i, name in enumerate(STEPS)}
    return PhaseBreakdown(kind, rnd, done_at - sent_at, steps, site)


def merged_log(texts: list[str]) -> str:
    """The stamped lines of several logs in time order (a site's SuperNode and launcher logs).

    With fedsafe's launcher the ClientApp's lines are in the launcher's log, not the
    SuperNode's; merged, they read as one site's log. Lines without a stamp are dropped.
    """
    lines: list[tuple[float, int, str]] = []
    for text in texts:
        for raw in text.splitlines():
            line = _ANSI.sub("", raw)
            stamp = _stamp(line)
            if stamp is not None:
                lines.append((stamp, len(lines), line))
    return "\n".join(line for _, _, line in sorted(lines))


def read_site_logs(paths: dict[str, Path | list[Path]]) -> dict[str, list[Episode]]:
    """:func:`site_episodes` of each site's SuperNode log (or logs, merged), by site name."""
    out = {}
    for site, path in paths.items():
        files = path if isinstance(path, list) else [path]
        texts = [Path(f).read_text(errors="replace") for f in files if Path(f).is_file()]
        out[site] = site_episodes(texts[0] if len(texts) == 1 else merged_log(texts))
    return out


_ACCESS = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z .*\[uvicorn\.access\] "
    r"[\d.]+:(\d+) - \"POST (/v1/fleet/[\w-]+)"
)


@dataclass(frozen=True)
class FleetTraffic:
    """Fleet API requests the SuperLink served in a time window, from its access log.

    Parameters
    ----------
    requests
        Number of requests (every one crosses TLS when TLS is on).
    connections
        Distinct client connections (client ports) that sent them; each is one TLS handshake.
    """

    requests: int
    connections: int


def fleet_traffic(superlink_log: str, start: float, end: float) -> FleetTraffic:
    """Count the SuperLink's Fleet API requests and client connections in ``[start, end]``.

    Parameters
    ----------
    superlink_log
        The SuperLink's output with ``FLWR_LOG_LEVEL=DEBUG`` (uvicorn's access lines, stamped
        in UTC).
    start, end
        Epoch seconds.
    """
    requests = 0
    ports: set[str] = set()
    for raw in superlink_log.splitlines():
        match = _ACCESS.match(_ANSI.sub("", raw))
        if match is None:
            continue
        stamp = datetime.strptime(match.group(1) + "+0000", "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        if start <= stamp <= end:
            requests += 1
            ports.add(match.group(2))
    return FleetTraffic(requests, len(ports))


def median_steps(phases: list[PhaseBreakdown]) -> dict[str, float]:
    """Median seconds of each step, and of the wall time, over ``phases``."""
    if not phases:
        return {}
    out = {name: statistics.median(p.steps_s[name] for p in phases) for name in STEPS}
    out["wall"] = statistics.median(p.wall_s for p in phases)
    return out
