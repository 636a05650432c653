"""The real ClientApp with ledger receipts (issue 13): a rolled-back ledger refuses to train."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MessageType

from fedsafe.client.app import app
from fedsafe.models import build_model
from fedsafe.privacy.receipts import RECEIPT_KEYS, LedgerReceipt
from tests.client.test_app import RUN, Site, _assert_declared, _context, _message


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ClientApp process has: its run, node and task ids (replies are stamped)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _receipt(reply_site: ConfigRecord) -> LedgerReceipt:
    return LedgerReceipt.from_metrics({k: reply_site[k] for k in RECEIPT_KEYS})


def _checkpoint(ledger: Path) -> None:
    with closing(sqlite3.connect(ledger, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_a_rolled_back_ledger_refuses_the_coordinators_later_receipt(
    tmp_path: Path, ledger_secrets: Path
) -> None:
    site = Site(tmp_path / "site")
    width = site.width()
    context = _context(site.node_config, RUN)
    first = app(_message(MessageType.TRAIN, width, server_round=1), context)
    assert not first.has_error(), first.error
    model_keys = set(build_model("logreg", width, 42).state_dict())
    _assert_declared(first, model_keys)
    receipt1 = _receipt(first.content.config_records["site"])
    assert receipt1.count == 1 and receipt1.lifetime_epsilon > 0
    _checkpoint(site.ledger)
    shutil.copy2(site.ledger, tmp_path / "ledger-backup.sqlite")
    shutil.copytree(ledger_secrets, tmp_path / "secrets-backup")

    second = _message(MessageType.TRAIN, width, server_round=2)
    second.content["receipt"] = ConfigRecord(receipt1.to_metrics())
    reply = app(second, context)
    assert not reply.has_error(), reply.error
    receipt2 = _receipt(reply.content.config_records["site"])
    assert receipt2.count == 2 and receipt2.lifetime_epsilon > receipt1.lifetime_epsilon

    # The admin restores the older ledger together with its secrets folder.
    shutil.rmtree(ledger_secrets)
    shutil.copytree(tmp_path / "secrets-backup", ledger_secrets)
    for suffix in ("-wal", "-shm"):
        Path(str(site.ledger) + suffix).unlink(missing_ok=True)
    shutil.copy2(tmp_path / "ledger-backup.sqlite", site.ledger)
    before = site.ledger_bytes()

    again = _message(MessageType.TRAIN, width, server_round=2)
    again.content["receipt"] = ConfigRecord(receipt2.to_metrics())
    refused = app(again, _context(site.node_config, RUN))
    assert not refused.has_error(), refused.error
    assert {n: set(r) for n, r in refused.content.items()} == {
        "metrics": {"refused"},
        "site": {"site-name", "refused-setting", "refusal-reason"},
    }
    record = refused.content.config_records["site"]
    assert record["refused-setting"] == "ledger-receipt"
    assert "holds 1 entries but the coordinator's receipt 2" in str(record["refusal-reason"])
    assert site.ledger_bytes() == before  # nothing trained, nothing spent

    # Without the later receipt the restored ledger is accepted: receipts only ever refuse.
    plain = app(_message(MessageType.TRAIN, width, server_round=2), _context(site.node_config, RUN))
    assert not plain.has_error(), plain.error
    assert "arrays" in plain.content.array_records


def test_a_malformed_receipt_is_refused_before_training(tmp_path: Path) -> None:
    site = Site(tmp_path / "site")
    msg = _message(MessageType.TRAIN, site.width())
    msg.content["receipt"] = ConfigRecord({"receipt-count": 1})
    reply = app(msg, _context(site.node_config, RUN))
    assert reply.content.config_records["site"]["refused-setting"] == "ledger-receipt"
    assert "arrays" not in reply.content.array_records
    assert not site.ledger.exists()  # refused before the ledger was opened
