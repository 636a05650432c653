"""Report figures of an account that crossed from PRV to PLD (attack 17b)."""

from __future__ import annotations

from pathlib import Path

from fedsafe.privacy.accounting import PRV_MECHANISM_LIMIT
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.fingerprint import fingerprint_bytes
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.reporting.report_data import composed_lifetime, lifetime_now


def test_lifetime_now_never_reads_below_the_prv_values_recorded_before_pld(
    tmp_path: Path,
) -> None:
    fp = fingerprint_bytes(b"records", b"schema")
    runs = [PoissonGaussianEvent(0.02, 1.0 + 0.05 * i, 50) for i in range(PRV_MECHANISM_LIMIT)]
    with SitePrivacyLedger.open(tmp_path / "l.sqlite") as ledger:
        for i, e in enumerate([*runs, PoissonGaussianEvent(0.02, 5.0, 1)]):
            ledger.record(f"run-{i}", 1, e, 1.0, 1e-5, fp)
        entries = tuple(ledger.entries())
    assert entries[-1].accountant == "pld"
    composed = composed_lifetime(entries, 1e-5)
    recorded = max(e.epsilon_after for e in entries)
    assert composed < recorded  # PLD of nine mechanisms below PRV of eight
    assert lifetime_now(entries, 1e-5) == recorded
    assert lifetime_now((), 1e-5) == 0.0
