"""Ledger receipts: a site's ledger must extend the coordinator's last receipt (issue 13)."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.privacy.ledger_anchor import LedgerSecrets
from fedsafe.privacy.receipts import LedgerReceipt, lifetime_went_down, refusal

EVENT = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=50)


def _record(ledger: SitePrivacyLedger, n: int) -> None:
    for r in range(n):
        ledger.record("run", r, EVENT, 1.0, 1e-5, "sha256:d", accountant="rdp")


def test_ledger_extends_its_own_receipts(tmp_path: Path) -> None:
    with SitePrivacyLedger.open(tmp_path / "a.sqlite") as ledger:
        empty = LedgerReceipt.of(ledger)
        _record(ledger, 2)
        receipt = LedgerReceipt.of(ledger)
        assert refusal(ledger, empty) is None and refusal(ledger, receipt) is None
        assert LedgerReceipt.from_metrics(receipt.to_metrics()) == receipt
        _record(ledger, 1)
        assert not lifetime_went_down(receipt, LedgerReceipt.of(ledger))
        assert lifetime_went_down(LedgerReceipt.of(ledger), receipt)


def test_ledger_and_anchor_lost_together_are_caught_by_the_receipt(
    tmp_path: Path, ledger_secrets: Path
) -> None:
    """The site restores ledger *and* secrets from an old backup: only the receipt knows."""
    path = tmp_path / "ledgers" / "a.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        _record(ledger, 1)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy2(path, tmp_path / "ledger-backup.sqlite")
    shutil.copytree(ledger_secrets, tmp_path / "secrets-backup")
    with SitePrivacyLedger.open(path) as ledger:
        _record(ledger, 2)
        receipt = LedgerReceipt.of(ledger)
    shutil.rmtree(ledger_secrets)
    shutil.copytree(tmp_path / "secrets-backup", ledger_secrets)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    shutil.copy2(tmp_path / "ledger-backup.sqlite", path)
    with SitePrivacyLedger.open(path, secrets_=LedgerSecrets.load()) as ledger:
        reason = refusal(ledger, receipt)
    assert reason is not None and "holds 1 entries but the coordinator's receipt 3" in reason


def test_malformed_receipt_is_refused() -> None:
    with pytest.raises(ValueError, match="malformed ledger receipt"):
        LedgerReceipt.from_metrics({"receipt-count": 1, "receipt-head": "x" * 64})
    with pytest.raises(ValueError, match="malformed"):
        LedgerReceipt.from_metrics(
            {"receipt-count": 1, "receipt-head": "z" * 64, "receipt-lifetime-epsilon": 1.0}
        )
