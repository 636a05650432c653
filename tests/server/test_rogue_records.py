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
