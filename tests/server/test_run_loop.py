"""The coordinator's round loop with a stand-in Grid (its own collaborator) and real strategies."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsafe.server.run_folder import RunFolder
from fedsafe.server.run_loop import run_rounds

Reply = Callable[[int, Message], RecordDict]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process has: its run, node and task ids (messages are stamped with them)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """Answers every message with ``reply(node, message)``; records who was asked.

    Replies come back one per pull, so the coordinator's pull loop has to go round.
    """

    def __init__(self, nodes: list[int], reply: Reply) -> None:
        self.nodes, self.reply, self.asked = nodes, reply, []
        self.ready: dict[str, Message] = {}
        self.pulls = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as the SuperLink does
            node = m.metadata.dst_node_id
            self.asked.append((m.metadata.message_type, node))
            self.ready[m.object_id] = Message(self.reply(node, m), reply_to=m)
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        for message_id in message_ids:
            if message_id in self.ready:
                return [self.ready.pop(message_id)]
        return []


def _model(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, np.float32))})


def _site(node: int) -> ConfigRecord:
    return ConfigRecord({"site-name": f"site-{node}"})


def test_bad_and_exhausted_sites_do_not_stop_the_round(tmp_path):
    def reply(node: int, msg: Message) -> RecordDict:
        if msg.metadata.message_type == "evaluate":
            metrics = MetricRecord({"num-examples": 10, "eval-accuracy": 0.5 + node / 10})
            return RecordDict({"metrics": metrics, "site": _site(node)})
        if node == 1:  # a good site
            metrics = MetricRecord({"num-examples": 10, "epsilon": 0.5, "delta": 1e-5})
            return RecordDict({"arrays": _model(1.0), "metrics": metrics, "site": _site(node)})
        if node == 2:  # a wrong model shape
            bad = ArrayRecord({"w": Array(np.zeros(5, np.float32))})
            metrics = MetricRecord({"num-examples": 10})
            return RecordDict({"arrays": bad, "metrics": metrics, "site": _site(node)})
        metrics = MetricRecord({"budget-exhausted": 1, "epsilon": 3.0, "delta": 1e-5})
        return RecordDict({"metrics": metrics, "site": _site(node)})

    grid = FakeGrid([1, 2, 3], reply)
    strategy = FedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    folder = RunFolder(tmp_path)
    final, state = run_rounds(grid, strategy, _model(0.0), 2, folder)  # type: ignore[arg-type]

    np.testing.assert_allclose(final["w"].numpy(), 1.0)  # only the good site was averaged
    rounds = folder.rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    first = rounds[0]["sites"]
    assert first["site-1"]["status"] == "trained"
    assert first["site-2"]["status"] == "dropped" and "shape" in first["site-2"]["reason"]
    assert first["site-3"]["status"] == "budget-exhausted"
    assert rounds[1]["sites"]["site-3"]["status"] == "budget-exhausted"
    # The exhausted site is not asked to train again, but is still evaluated.
    assert ("train", 3) not in grid.asked[len(grid.asked) // 2 :]
    assert grid.asked.count(("evaluate", 3)) == 2
    assert state.exhausted == {3: "site-3"}
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert "reply-dropped" in kinds and "budget-exhausted" in kinds
    assert rounds[0]["mean_accuracy"] == pytest.approx(0.7)
    # Every reply was collected although each pull returned one; each phase's send and
    # receive times are recorded for the timeline.
    assert grid.pulls == 3 + 3 + 2 + 3  # one reply per pull; round 2 trains 2 sites
    for record in rounds:
        assert set(record["phases"]) == {"train", "evaluate"}
        train, evaluate = record["phases"]["train"], record["phases"]["evaluate"]
        assert train[0] <= train[1] <= evaluate[0] <= evaluate[1]


def test_the_run_ends_when_every_site_is_exhausted(tmp_path):
    def reply(node: int, msg: Message) -> RecordDict:
        if msg.metadata.message_type == "evaluate":
            return RecordDict({"metrics": MetricRecord({"num-examples": 1}), "site": _site(node)})
        metrics = MetricRecord({"budget-exhausted": 1, "epsilon": 3.0, "delta": 1e-5})
        return RecordDict({"metrics": metrics, "site": _site(node)})

    grid = FakeGrid([1, 2], reply)
    strategy = FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    folder = RunFolder(tmp_path)
    final, state = run_rounds(grid, strategy, _model(0.0), 5, folder)  # type: ignore[arg-type]
    assert state.rounds_done == 1
    np.testing.assert_allclose(final["w"].numpy(), 0.0)
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "all-sites-exhausted" and events[-1]["round"] == 2
