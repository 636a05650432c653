"""A rogue admitted site against what the coordinator writes down (review of issue 16).

Replies that take the budget-exhausted or refusal path skip the update checks; what they
carry must still not reach ``events.jsonl`` or ``rounds.jsonl`` beyond the declared figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from tests.server.test_update_checks import NODES, ROGUE, _honest, _run


def _rogue(kind: str):
    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if node != ROGUE or msg.metadata.message_type != "train":
            return content
        metrics = dict(content["metrics"])
        if kind == "exhausted-undeclared":
            content["metrics"] = MetricRecord({**metrics, "budget-exhausted": 1, "patient-age": 63})
        elif kind == "exhausted-nan":
            content["metrics"] = MetricRecord(
                {"budget-exhausted": 1, "epsilon": math.nan, "delta": math.inf}
            )
        elif kind == "refused-long":
            content["metrics"] = MetricRecord({"refused": 1, "patient-age": 63})
            content["site"] = ConfigRecord(
                {"site-name": f"site-{node}", "refused-setting": "x" * 1_000_000,
                 "refusal-reason": "y" * 1_000_000}
            )  # fmt: skip
        return content

    return answer


@pytest.mark.parametrize("kind", ["exhausted-undeclared", "exhausted-nan", "refused-long"])
def test_a_stopping_reply_writes_only_declared_finite_bounded_figures(kind, tmp_path: Path):
    strategy, path = _run(_rogue(kind), tmp_path, NODES)
    assert strategy.progress.rounds_done == 2
    events = (path / "events.jsonl").read_text()
    rounds = (path / "rounds.jsonl").read_text()
    for text in (events, rounds):
        assert "patient-age" not in text
        assert "NaN" not in text and "Infinity" not in text
        assert len(text) < 100_000
    for record in map(json.loads, rounds.splitlines()):
        assert record["sites"][f"site-{ROGUE}"]["status"] in ("budget-exhausted", "refused")


@pytest.mark.parametrize("accuracy", [1e300, -5.0, 2.0])
def test_an_impossible_evaluation_is_not_averaged(accuracy, tmp_path: Path):
    """An accuracy outside [0, 1] (or a negative loss) no honest site reports: ignored."""

    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if node == ROGUE:
            key = "metrics" if msg.metadata.message_type == "evaluate" else "evaluation"
            if key in content:
                record = dict(content[key])
                content[key] = MetricRecord({**record, "eval-accuracy": accuracy})
        return content

    _, path = _run(answer, tmp_path, NODES)
    for record in map(json.loads, (path / "rounds.jsonl").read_text().splitlines()):
        assert 0.0 <= record["mean_accuracy"] <= 1.0
        assert "accuracy" not in record["sites"][f"site-{ROGUE}"]


def test_a_site_reporting_another_sites_name_does_not_overwrite_it(tmp_path: Path):
    """Without an admission record the reported name is used; a second node claiming a name
    already held by another node must not replace that site's record or borrow its size."""

    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if node == ROGUE:
            content["site"] = ConfigRecord({"site-name": "site-1"})
        return content

    _, path = _run(answer, tmp_path, NODES)
    for record in map(json.loads, (path / "rounds.jsonl").read_text().splitlines()):
        site1 = record["sites"]["site-1"]
        assert site1["status"] == "trained" and site1["num-examples"] == 100
        assert site1["accuracy"] == pytest.approx(0.1)


def test_a_long_reported_site_name_is_cut(tmp_path: Path):
    """Without an admission record the reported name is a key of rounds.jsonl: bounded."""

    def answer(node: int, msg: Message) -> RecordDict:
        content = _honest(node, msg)
        if node == ROGUE:
            content["site"] = ConfigRecord({"site-name": "z" * 1_000_000})
        return content

    _, path = _run(answer, tmp_path, NODES)
    assert len((path / "rounds.jsonl").read_text()) < 100_000
    assert len((path / "events.jsonl").read_text()) < 100_000


class _QueryGrid:
    """Answers the query before round 1 with hand-built replies (node -> content)."""

    def __init__(self, replies: dict[int, RecordDict]) -> None:
        self.replies = replies

    def get_node_ids(self) -> list[int]:
        return list(self.replies)

    def send_and_receive(self, messages, timeout=None):
        return [Message(self.replies[m.metadata.dst_node_id], reply_to=m) for m in messages]


def _query_reply(name: str, width: object = 3, size: object = 50) -> RecordDict:
    policy = json.dumps({"mode": "simulated", "public-size": size})
    site = {"site-name": name, "feature-names": '["a", "b", "c"]', "site-policy": policy}
    return RecordDict(
        {"metrics": MetricRecord({"num-features": width}), "site": ConfigRecord(site)}
    )


@pytest.mark.parametrize(
    "rogue",
    [
        RecordDict({"site": ConfigRecord({"site-name": "site-3"})}),  # no metrics
        _query_reply("site-3", width=math.inf),
        _query_reply("site-3", width=10**15),
        _query_reply("site-3", size=0),
        _query_reply("site-1", size=10**9),  # another site's name
    ],
)
def test_a_rogue_query_reply_is_dropped_before_round_one(rogue, tmp_path: Path):
    from fedsafe.config import RunConfig
    from fedsafe.server.app import _input_width
    from fedsafe.server.run_folder import RunFolder

    grid = _QueryGrid({1: _query_reply("site-1"), 2: _query_reply("site-2"), 3: rogue})
    folder = RunFolder(tmp_path)
    cfg = RunConfig.from_mapping({"scenario": "custom"})
    width, _, declared = _input_width(grid, 3, folder, cfg)  # type: ignore[arg-type]
    assert width == 3
    assert sorted(declared) == ["site-1", "site-2"]
    assert declared["site-1"].public_size == 50
    events = (tmp_path / "events.jsonl").read_text()
    assert "query-dropped" in events
