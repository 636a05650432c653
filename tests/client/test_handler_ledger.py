"""One ledger open per train message, shared by the site mods; its checks still run.

Real ClientApp calls (``fedsafe.client.app.app``) for a simulated heart site with a real
ledger, fedsafe run id, receipts and the release store; ``SitePrivacyLedger.open`` is counted
(the real one runs).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsafe.client.app import app
from fedsafe.client.handler_ledger import ledger_scope, site_ledger
from fedsafe.models import build_model
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import LedgerTamperedError, SitePrivacyLedger
from fedsafe.protocol import EVALUATE_FIRST, FEDSAFE_RUN_ID
from fedsafe.tasks.scenarios import load_scenario

RUN_ID = "0123456789abcdef0123456789abcdef"
EVENT = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=5)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ClientApp process has: its run, node and task ids (replies are stamped)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _train(server_round: int, receipt: dict[str, Any] | None = None) -> Message:
    width = load_scenario("heart").site(1).num_features
    config = {"server-round": server_round, FEDSAFE_RUN_ID: RUN_ID, EVALUATE_FIRST: True}
    content = RecordDict(
        {
            "config": ConfigRecord(config),
            "arrays": ArrayRecord(build_model("logreg", width, 42).state_dict()),
        }
    )
    if receipt is not None:
        content["receipt"] = ConfigRecord(receipt)
    msg = Message(content, dst_node_id=3, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does
    return msg


def _receipt(reply: Message) -> dict[str, Any]:
    from fedsafe.privacy.receipts import RECEIPT_KEYS

    site = reply.content.config_records["site"]
    return {k: site[k] for k in RECEIPT_KEYS}


def test_a_train_message_opens_the_ledger_once_and_closes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = {"scenario": "heart", "local-steps": 2, "num-server-rounds": 3}
    context = Context(
        run_id=11,
        node_id=3,
        node_config={"partition-id": 1, "num-partitions": 4},
        state=RecordDict(),
        run_config={**run, "ledger-dir": str(tmp_path / "ledgers")},
    )
    opened: list[SitePrivacyLedger] = []
    real_open = SitePrivacyLedger.open

    def counting_open(*args: Any, **kwargs: Any) -> SitePrivacyLedger:
        ledger = real_open(*args, **kwargs)
        opened.append(ledger)
        return ledger

    monkeypatch.setattr(SitePrivacyLedger, "open", counting_open)
    first = app(_train(1), context)
    assert not first.has_error(), first.error
    assert "arrays" in first.content.array_records
    opened.clear()
    # Round 2 carries the coordinator's receipt: checked, looked up in the release store,
    # budgeted, committed and receipted on one open ledger, closed when the handler returns.
    second = app(_train(2, _receipt(first)), context)
    assert not second.has_error(), second.error
    assert "arrays" in second.content.array_records
    assert len(opened) == 1
    with pytest.raises(sqlite3.ProgrammingError):
        opened[0]._conn.execute("SELECT 1")  # closed
    assert _receipt(second)["receipt-count"] == 2
    (path,) = (tmp_path / "ledgers").glob("*.sqlite")
    with real_open(path) as ledger:
        assert [(e.run_id, e.round) for e in ledger.entries()] == [(RUN_ID, 1), (RUN_ID, 2)]


def test_a_scope_shares_one_ledger_per_path_and_account(tmp_path: Path) -> None:
    path = tmp_path / "site.sqlite"
    with ledger_scope():
        with site_ledger(path) as a, site_ledger(tmp_path / "." / "site.sqlite") as b:
            assert a is b
        with site_ledger(path, account="hospital-a") as c:
            assert c is not a  # opened again, with its account binding checked
        with ledger_scope(), site_ledger(path) as d:  # a nested scope is the outer one
            assert d is a
        a.record("run", 1, EVENT, 1.0, 1e-5, "fp", accountant="rdp")
    with pytest.raises(sqlite3.ProgrammingError):
        a._conn.execute("SELECT 1")
    with site_ledger(path) as e:  # outside a scope: opened and closed around the block
        assert e is not a and len(e.entries()) == 1
    with pytest.raises(sqlite3.ProgrammingError):
        e._conn.execute("SELECT 1")


def test_a_shared_ledger_still_refuses_a_file_replaced_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "site.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        ledger.record("run", 1, EVENT, 1.0, 1e-5, "fp", accountant="rdp")
    with ledger_scope():
        with site_ledger(path) as first:
            pass
        path.rename(tmp_path / "aside.sqlite")  # e.g. `privacy new-account` moved it
        path.write_bytes((tmp_path / "aside.sqlite").read_bytes())
        with site_ledger(path) as again, pytest.raises(LedgerTamperedError, match="replaced"):
            assert again is first
            again.record("run", 2, EVENT, 1.0, 1e-5, "fp", accountant="rdp")
