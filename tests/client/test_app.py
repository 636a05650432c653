"""The real ClientApp, called as Flower calls it: the site policy binds, nothing undeclared leaves.

Each test builds the Message and Context a SuperNode hands the ClientApp (flwr's
``ClientApp.__call__``), with a real site CSV, schema, policy file and SQLite ledger, and checks
the reply's content itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedsafe.client.app import app
from fedsafe.client.policy import SitePolicy
from fedsafe.client.site_errors import SITE_ERROR_MESSAGES, SiteErrorCode
from fedsafe.compression.wire import WIRE_KEY
from fedsafe.data.schema import load_site_data
from fedsafe.models import build_model
from fedsafe.privacy.releases import (
    DECLARED_CONFIG_KEYS,
    DECLARED_METRIC_KEYS,
)

SCHEMA = """label: {column: outcome, positive: yes}
drop: [patient_id]
features:
  age: {type: numeric, range: [18, 100], source: "years, adult patients"}
  smoker: {type: categorical, categories: [no, yes]}
"""


def _csv(rows: int, bad_cell: str | None = None) -> str:
    lines = ["patient_id,age,smoker,outcome"]
    for i in range(rows):
        smoker = "yes" if i % 3 else "no"
        if bad_cell is not None and i == 17:
            smoker = f'"{bad_cell}"'
        outcome = "yes" if i % 2 else "no"
        lines.append(f"{i},{30 + i % 40},{smoker},{outcome}")
    return "\n".join(lines) + "\n"


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ClientApp process has: its run, node and task ids (replies are stamped)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Site:
    """A deployed site on disk: data, schema, policy file, ledger path."""

    def __init__(self, root: Path, rows: int = 160, **csv: Any) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.data, self.schema = root / "site.csv", root / "schema.yaml"
        self.data.write_text(_csv(rows, **csv))
        self.schema.write_text(SCHEMA)
        self.policy = SitePolicy.for_records(
            rows, public_size=90, min_records=20, max_rounds=5, max_local_steps=20
        )
        self.policy_path = root / "policy.toml"
        self.policy_path.write_text(self.policy.to_toml())
        self.ledger = root / "ledger.sqlite"
        self.node_config: dict[str, Any] = {
            "site-name": "hospital-a",
            "data-path": str(self.data),
            "schema-path": str(self.schema),
            "ledger-path": str(self.ledger),
            "policy-path": str(self.policy_path),
            "device": "cpu",
        }

    def width(self) -> int:
        return load_site_data("w", self.data, self.schema).num_features

    def ledger_bytes(self) -> bytes:
        return self.ledger.read_bytes() if self.ledger.exists() else b""


RUN = {"scenario": "custom", "local-steps": 3, "batch-size": 8, "num-server-rounds": 2}


def _context(node_config: dict[str, Any], run_config: dict[str, Any]) -> Context:
    return Context(
        run_id=11, node_id=3, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _message(kind: str, width: int, server_round: int = 1, model: str = "logreg") -> Message:
    from flwr.app import ArrayRecord

    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    if kind != MessageType.QUERY:
        content["arrays"] = ArrayRecord(build_model(model, width, 42).state_dict())
    msg = Message(content, dst_node_id=3, message_type=kind)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does
    return msg


def _content_keys(reply: Message) -> dict[str, set[str]]:
    return {name: set(record) for name, record in reply.content.items()}


def _assert_declared(reply: Message, model_keys: set[str]) -> None:
    """Every record, key and array name in the reply is declared in releases.py."""
    for name, record in reply.content.items():
        if name in reply.content.array_records:
            assert name == "arrays"
            assert set(record) <= model_keys | {WIRE_KEY}
        elif name in reply.content.metric_records:
            assert name == "metrics"
            assert set(record) <= DECLARED_METRIC_KEYS, set(record) - DECLARED_METRIC_KEYS
        else:
            assert name == "site"
            assert set(record) <= DECLARED_CONFIG_KEYS, set(record) - DECLARED_CONFIG_KEYS


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def test_deployed_site_trains_and_sends_only_declared_values(site: Site) -> None:
    width = site.width()
    model_keys = set(build_model("logreg", width, 42).state_dict())
    context = _context(site.node_config, RUN)
    reply = app(_message(MessageType.TRAIN, width), context)
    assert not reply.has_error(), reply.error
    _assert_declared(reply, model_keys)
    metrics = reply.content.metric_records["metrics"]
    # The public size from the policy, never the exact number of training records.
    assert metrics["num-examples"] == 90
    assert metrics["sample-rate"] == pytest.approx(1 / 12)  # 1 / ceil(90 / 8)
    assert metrics["noise-multiplier"] >= site.policy.min_noise_multiplier
    assert metrics["delta"] == site.policy.delta
    assert "not-private" not in metrics
    assert site.ledger.exists()

    evaluation = app(_message(MessageType.EVALUATE, width), context)
    assert not evaluation.has_error(), evaluation.error
    _assert_declared(evaluation, model_keys)
    assert "num-examples" not in evaluation.content.metric_records["metrics"]

    query = app(_message(MessageType.QUERY, width), context)
    _assert_declared(query, model_keys)
    assert query.content.metric_records["metrics"]["num-examples"] == 90
    declared = json.loads(str(query.content.config_records["site"]["site-policy"]))
    assert declared.pop("mode") == "deployed"
    assert SitePolicy.from_mapping(declared) == site.policy


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ({"dp": False}, "dp"),
        ({"reproducible-noise": True, "seed": 7}, "reproducible-noise"),
        ({"noise-multiplier": 0.1}, "noise-multiplier"),
        ({"local-steps": 500}, "local-steps"),
        ({"num-server-rounds": 500}, "num-server-rounds"),
        ({"target-epsilon": 50.0}, "target-epsilon"),
        ({"target-delta": 0.005}, "target-delta"),
    ],
)
def test_a_run_asking_for_less_is_refused_and_nothing_else_leaves(
    site: Site, override: dict[str, Any], setting: str
) -> None:
    width = site.width()
    # A first, allowed round fills the ledger; the refused run must leave it byte for byte.
    app(_message(MessageType.TRAIN, width), _context(site.node_config, RUN))
    before = site.ledger_bytes()
    assert before
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = app(_message(kind, width), _context(site.node_config, {**RUN, **override}))
        assert not reply.has_error(), reply.error
        assert _content_keys(reply) == {
            "metrics": {"refused"},
            "site": {"site-name", "refused-setting", "refusal-reason"},
        }
        assert reply.content.metric_records["metrics"]["refused"] == 1
        assert reply.content.config_records["site"]["refused-setting"] == setting
    assert site.ledger_bytes() == before


def test_simulation_claimed_in_the_run_config_changes_nothing(site: Site, tmp_path: Path) -> None:
    width = site.width()
    claims = {"partition-id": 0, "num-partitions": 2, "simulation": True, "simulated": True}
    # Without DP: refused, whatever the run config says about simulation.
    refused = app(
        _message(MessageType.TRAIN, width),
        _context(site.node_config, {**RUN, **claims, "dp": False}),
    )
    assert refused.content.config_records["site"]["refused-setting"] == "dp"
    # With DP but a coordinator-chosen ledger and budget: the site's own are used.
    elsewhere = tmp_path / "coordinator-ledgers"
    reply = app(
        _message(MessageType.TRAIN, width),
        _context(
            site.node_config,
            {**RUN, **claims, "ledger-dir": str(elsewhere), "budget-epsilon": 1000.0},
        ),
    )
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert "not-private" not in metrics
    assert metrics["delta"] == site.policy.delta
    assert site.ledger.exists() and not elsewhere.exists()


def test_a_simulated_site_is_told_by_its_node_config_and_marked_not_private() -> None:
    context = _context(
        {"partition-id": 0, "num-partitions": 4},
        {"scenario": "heart", "dp": False, "local-steps": 2, "ledger-dir": ""},
    )
    from fedsafe.tasks.scenarios import load_scenario

    width = load_scenario("heart").site(0).num_features
    reply = app(_message(MessageType.TRAIN, width), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert metrics["not-private"] == 1
    assert "epsilon" not in metrics


def test_reproducible_noise_replays_only_at_a_simulated_site_and_is_marked() -> None:
    from fedsafe.tasks.scenarios import load_scenario

    width = load_scenario("heart").site(0).num_features
    run = {"scenario": "heart", "reproducible-noise": True, "local-steps": 2, "ledger-dir": ""}
    replies = [
        app(
            _message(MessageType.TRAIN, width),
            _context({"partition-id": 0, "num-partitions": 4}, run),
        )
        for _ in range(2)
    ]
    arrays = [r.content.array_records["arrays"].to_numpy_ndarrays() for r in replies]
    assert all((a == b).all() for a, b in zip(*arrays, strict=True))
    assert all(r.content.metric_records["metrics"]["not-private"] == 1 for r in replies)


def test_a_site_error_holding_a_cell_value_reaches_the_coordinator_as_a_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Jane Doe, MRN 4471"
    site = Site(tmp_path / "bad", bad_cell=secret)
    with caplog.at_level(logging.ERROR, logger="flwr.fedsafe.client"):
        reply = app(_message(MessageType.TRAIN, 3), _context(site.node_config, RUN))
    assert reply.has_error()
    assert reply.error.code == SiteErrorCode.SITE_SETUP
    assert reply.error.reason == SITE_ERROR_MESSAGES[SiteErrorCode.SITE_SETUP]
    assert "Jane" not in str(reply.error.reason) and str(site.data) not in str(reply.error.reason)
    assert not reply.has_content()
    # The details stay in the site's own log.
    assert secret in caplog.text or "Jane" in caplog.text


def test_a_site_without_a_policy_is_refused_with_a_code(site: Site) -> None:
    node_config = {k: v for k, v in site.node_config.items() if k != "policy-path"}
    reply = app(_message(MessageType.TRAIN, site.width()), _context(node_config, RUN))
    assert reply.has_error()
    assert reply.error.code == SiteErrorCode.SITE_POLICY
    assert reply.error.reason == SITE_ERROR_MESSAGES[SiteErrorCode.SITE_POLICY]


def test_a_bad_run_config_is_a_code_too(site: Site) -> None:
    reply = app(
        _message(MessageType.TRAIN, site.width()),
        _context(site.node_config, {**RUN, "batch-size": "many"}),
    )
    assert reply.has_error()
    assert reply.error.code == SiteErrorCode.RUN_CONFIG


def test_too_few_records_are_refused(tmp_path: Path) -> None:
    # (A one-class file is refused by the schema loader; a one-class split by size_refusal,
    # tested in test_policy.py.)
    site = Site(tmp_path / "small", rows=12)
    reply = app(_message(MessageType.TRAIN, site.width()), _context(site.node_config, RUN))
    assert not reply.has_error(), reply.error
    assert _content_keys(reply) == {
        "metrics": {"refused"},
        "site": {"site-name", "refused-setting", "refusal-reason"},
    }
    assert reply.content.config_records["site"]["refused-setting"] == "min-records"
    assert not site.ledger.exists()


def test_rounds_beyond_the_run_are_refused_whatever_the_coordinator_sends(site: Site) -> None:
    width = site.width()
    context = _context(site.node_config, {**RUN, "num-server-rounds": 1})
    first = app(_message(MessageType.TRAIN, width, 1), context)
    assert "refused" not in first.content.metric_records["metrics"]
    before = site.ledger_bytes()
    extra = app(_message(MessageType.TRAIN, width, 2), context)
    assert extra.content.config_records["site"]["refused-setting"] == "num-server-rounds"
    assert site.ledger_bytes() == before
