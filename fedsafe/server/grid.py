"""A grid wrapper that collects replies as they arrive and keeps a deadline per phase.

Flower's ``Grid.send_and_receive`` (``HttpGrid``, the grid of a ServerApp process on both
engines in flwr 1.42) pulls, and then sleeps 3 s whenever a reply is still missing: every
phase of every round ends up to 3 s after its last reply. :class:`PromptGrid` wraps any
:class:`flwr.serverapp.Grid` and pulls on a short exponential backoff instead (5 ms, doubling
up to 100 ms; after a pull that brought replies, the next pull is immediate and the backoff
starts again: :class:`PollBackoff`), so a phase ends within
about 100 ms of its last reply at the cost of at most 10 small local pulls per second.

It also

- offers only live nodes: :meth:`PromptGrid.get_node_ids` drops nodes whose status is not
  ``online`` or whose heartbeat lease (``online_until``) has passed, so a strategy never samples
  a site that cannot answer;
- gives each phase its own deadline (:class:`PhaseDeadlines`: ``train``, ``evaluate``,
  ``query``), the smaller of it and the ``timeout`` the caller passes; and
- reports every exchange (:class:`Exchange`: when it was pushed, when it ended, which nodes
  answered and which missed the deadline) to its observers, which is how the run folder names
  the sites that missed a deadline and records each phase's send and receive times.

The wrapper never changes a message or a reply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from flwr.app import Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run

#: The status string of a connected node in the SuperLink's node table.
ONLINE = "online"

PHASES = ("train", "evaluate", "query")


@dataclass(frozen=True, slots=True)
class PollBackoff:
    """Seconds between pulls while replies are missing: ``first_s * factor**k``, capped.

    Parameters
    ----------
    first_s
        The first wait after a pull that brought nothing (seconds, > 0).
    factor
        Growth per empty pull (>= 1).
    max_s
        The longest wait (seconds, >= ``first_s``).

    Raises
    ------
    ValueError
        If a value is out of range.
    """

    first_s: float = 0.005
    factor: float = 2.0
    max_s: float = 0.1

    def __post_init__(self) -> None:
        if not (self.first_s > 0 and math.isfinite(self.first_s)):
            raise ValueError(f"PollBackoff.first_s must be > 0, got {self.first_s}")
        if not self.factor >= 1:
            raise ValueError(f"PollBackoff.factor must be >= 1, got {self.factor}")
        if not (self.max_s >= self.first_s and math.isfinite(self.max_s)):
            raise ValueError(f"PollBackoff.max_s must be >= first_s, got {self.max_s}")

    def waits(self) -> Iterator[float]:
        """The waits after successive empty pulls (an endless iterator)."""
        wait = self.first_s
        while True:
            yield wait
            wait = min(wait * self.factor, self.max_s)


@dataclass(frozen=True, slots=True)
class PhaseDeadlines:
    """How long a phase waits for replies (seconds from the push), per phase.

    Raises
    ------
    ValueError
        If a deadline is not a positive number.
    """

    train_s: float = 3600.0
    evaluate_s: float = 3600.0
    query_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("train_s", "evaluate_s", "query_s"):
            value = getattr(self, name)
            if not (value > 0 and not math.isnan(value)):
                raise ValueError(f"PhaseDeadlines.{name} must be > 0 seconds, got {value}")

    def of(self, phase: str) -> float:
        """The deadline of ``phase`` (``train``, ``evaluate`` or ``query``)."""
        return {"train": self.train_s, "evaluate": self.evaluate_s, "query": self.query_s}[phase]


@dataclass(frozen=True, slots=True)
class Exchange:
    """One push and the replies collected for it.

    Attributes
    ----------
    phase
        ``train`` if any message trains, else ``evaluate`` or ``query``.
    sent_at, done_at
        Epoch seconds: when the messages were pushed, when the last reply came or the
        deadline passed.
    asked, answered, missed
        Node ids: the destinations, those that replied, those that missed the deadline.
    deadline_s
        The deadline that applied (seconds).
    pulls
        How many pulls it took.
    """

    phase: str
    sent_at: float
    done_at: float
    asked: tuple[int, ...]
    answered: tuple[int, ...]
    missed: tuple[int, ...]
    deadline_s: float
    pulls: int


ExchangeObserver = Callable[[Exchange], None]


def phase_of(messages: Iterable[Message]) -> str:
    """The phase a batch of messages belongs to (a train message makes it ``train``)."""
    kinds = {m.metadata.message_type for m in messages}
    if MessageType.TRAIN in kinds:
        return "train"
    if MessageType.QUERY in kinds and MessageType.EVALUATE not in kinds:
        return "query"
    return "evaluate"


def is_live(node: NodeInfo, now: float) -> bool:
    """Whether ``node`` can answer: online, and its heartbeat lease not past.

    A node without a status (a grid that only knows node ids) counts as live.
    """
    if node.status and node.status != ONLINE:
        return False
    return not (node.HasField("online_until") and node.online_until < now)


class PromptGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that pulls replies promptly and keeps phase deadlines.

    Parameters
    ----------
    inner
        The grid Flower gave the ServerApp.
    deadlines
        Deadline per phase.
    backoff
        The waits between pulls.
    observers
        Called with each :class:`Exchange` once it ends.
    clock, sleep
        Monotonic clock and sleep (seconds); tests pass their own.
    """

    def __init__(
        self,
        inner: Grid,
        deadlines: PhaseDeadlines | None = None,
        backoff: PollBackoff | None = None,
        observers: Iterable[ExchangeObserver] = (),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.deadlines = deadlines or PhaseDeadlines()
        self.backoff = backoff or PollBackoff()
        self.observers = list(observers)
        self._clock, self._sleep = clock, sleep

    # -- delegated -------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the run (delegated)."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The run (delegated)."""
        return self.inner.run

    def create_message(  # noqa: D102 - deprecated in Flower; delegated
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages (delegated)."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies (delegated)."""
        return self.inner.pull_messages(message_ids)

    # -- live nodes ------------------------------------------------------------------------
    def get_nodes(self) -> Iterable[NodeInfo]:
        """The nodes that can answer now (see :func:`is_live`)."""
        now = time.time()
        return [n for n in self.inner.get_nodes() if is_live(n, now)]

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the nodes that can answer now."""
        return [n.node_id for n in self.get_nodes()]

    # -- exchange --------------------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; collect replies as they arrive until all are in or time is up.

        The wait is the phase's deadline, or ``timeout`` if that is shorter. Nodes that have
        not answered by then are reported in the :class:`Exchange` given to the observers.
        """
        batch = list(messages)
        if not batch:
            return []
        phase = phase_of(batch)
        limit = self.deadlines.of(phase)
        if timeout is not None:
            limit = min(limit, timeout)
        sent_at = time.time()
        pushed = {str(mid) for mid in self.inner.push_messages(batch) if mid}
        # Both of Flower's grids stamp each message with its id when they push it.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in batch}
        pending = set(pushed)
        unsent = [node for mid, node in node_of.items() if mid not in pushed]
        end = self._clock() + limit
        replies: list[Message] = []
        waits = self.backoff.waits()
        pulls = 0
        while pending:
            got = list(self.inner.pull_messages(pending))
            pulls += 1
            if got:
                replies.extend(got)
                pending -= {m.metadata.reply_to_message_id for m in got}
                waits = self.backoff.waits()
            left = end - self._clock()
            if not pending or left <= 0:
                break
            if not got:  # after replies, more may be waiting already: pull again at once
                self._sleep(min(next(waits), left))
        answered = tuple(m.metadata.src_node_id for m in replies)
        exchange = Exchange(
            phase=phase,
            sent_at=sent_at,
            done_at=time.time(),
            asked=tuple(node_of.values()),
            answered=answered,
            missed=tuple(sorted([node_of.get(mid, -1) for mid in pending] + unsent)),
            deadline_s=limit,
            pulls=pulls,
        )
        for observe in self.observers:
            observe(exchange)
        return replies
