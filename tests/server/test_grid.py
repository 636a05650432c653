"""The grid wrapper: replies collected as they arrive, only live nodes, a deadline per phase.

Time is a fake clock advanced by the wrapper's own sleeps, so no test depends on speed.
"""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

from fedsafe.server.grid import Exchange, PhaseDeadlines, PollBackoff, PromptGrid, phase_of
from tests.server.fake_grid import FakeGrid


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _answer(node: int, msg: Message) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": node})})


def _messages(nodes, kind=MessageType.TRAIN) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord()}), n, kind) for n in nodes]


def _grid(fake: FakeGrid, **kwargs) -> tuple[PromptGrid, FakeClock, list[Exchange]]:
    clock, seen = FakeClock(), []
    grid = PromptGrid(
        fake,  # type: ignore[arg-type]
        observers=[seen.append],
        clock=clock,
        sleep=clock.sleep,
        **kwargs,
    )
    return grid, clock, seen


def test_backoff_doubles_from_5_ms_to_a_100_ms_cap():
    waits = PollBackoff().waits()
    assert [round(next(waits), 3) for _ in range(7)] == [0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1]


@pytest.mark.parametrize(
    "bad",
    [{"first_s": 0}, {"factor": 0.5}, {"first_s": 0.2, "max_s": 0.1}, {"max_s": float("inf")}],
)
def test_backoff_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="PollBackoff"):
        PollBackoff(**bad)


def test_deadlines_must_be_positive():
    with pytest.raises(ValueError, match="train_s"):
        PhaseDeadlines(train_s=0)


def test_every_reply_is_collected_without_sleeping_while_replies_flow():
    fake = FakeGrid([1, 2, 3], _answer)
    grid, clock, seen = _grid(fake)
    replies = list(grid.send_and_receive(_messages([1, 2, 3])))
    assert sorted(m.metadata.src_node_id for m in replies) == [1, 2, 3]
    assert fake.pulls == 3 and clock.sleeps == []  # one reply per pull, no wait between
    (exchange,) = seen
    assert exchange.phase == "train" and exchange.missed == () and exchange.pulls == 3
    assert sorted(exchange.answered) == [1, 2, 3]


def test_a_silent_node_is_reported_at_the_phase_deadline():
    fake = FakeGrid([1, 2, 3], _answer)
    fake.silent.add(2)
    grid, clock, seen = _grid(fake, deadlines=PhaseDeadlines(train_s=5.0, evaluate_s=1.0))
    replies = list(grid.send_and_receive(_messages([1, 2, 3], MessageType.EVALUATE)))
    assert sorted(m.metadata.src_node_id for m in replies) == [1, 3]
    (exchange,) = seen
    assert exchange.phase == "evaluate" and exchange.missed == (2,)
    assert exchange.deadline_s == 1.0
    assert clock.now == pytest.approx(1.0)  # gave up at the evaluate deadline, not train's
    assert max(clock.sleeps) <= 0.1 + 1e-12  # never a long sleep


def test_the_callers_timeout_wins_when_shorter():
    fake = FakeGrid([1], _answer)
    fake.silent.add(1)
    grid, clock, seen = _grid(fake, deadlines=PhaseDeadlines(train_s=50.0))
    assert list(grid.send_and_receive(_messages([1]), timeout=0.3)) == []
    assert seen[0].deadline_s == 0.3 and clock.now == pytest.approx(0.3)


def test_only_live_nodes_are_offered():
    class Nodes(FakeGrid):
        def get_nodes(self):
            now = time.time()
            return [
                NodeInfo(node_id=1, status="online", online_until=now + 60),
                NodeInfo(node_id=2, status="offline"),
                NodeInfo(node_id=3, status="online", online_until=now - 60),  # lease passed
                NodeInfo(node_id=4, status="online"),
            ]

    grid, _, _ = _grid(Nodes([], _answer))
    assert sorted(grid.get_node_ids()) == [1, 4]


def test_an_empty_batch_sends_nothing():
    fake = FakeGrid([1], _answer)
    grid, _, seen = _grid(fake)
    assert list(grid.send_and_receive([])) == []
    assert fake.asked == [] and seen == []


def test_phase_of_a_mixed_batch_is_train():
    mixed = _messages([1]) + _messages([2], MessageType.EVALUATE)
    assert phase_of(mixed) == "train"
    assert phase_of(_messages([1], MessageType.QUERY)) == "query"
