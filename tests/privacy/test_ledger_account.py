"""One account per site: schema comments, re-exports and new data versions compose (issue 13).

Real files (the shipped lending CSV and schema), the real budget check and ledger; the lifetime
epsilon is checked against dp-accounting's PLD accountant over every release on the site.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsafe.errors import BudgetExhaustedError
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.budget import PrivacyBudget, check_round, record_round
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.fingerprint import dataset_fingerprint
from fedsafe.privacy.ledger import SitePrivacyLedger

FILES = Path(__file__).resolve().parents[2] / "fedsafe" / "data" / "files"
EVENT = PoissonGaussianEvent(sample_rate=0.05, noise_multiplier=1.0, steps=20)
DELTA = 1e-4


def _versions(tmp_path: Path) -> list[str]:
    """Fingerprints of: the data; with a schema comment; re-exported with CRLF line endings."""
    csv, schema = FILES / "lending_club.csv", FILES / "lending_schema.yaml"
    commented = tmp_path / "schema-commented.yaml"
    commented.write_text("# reviewed by the DPO\n" + schema.read_text())
    reexported = tmp_path / "reexport.csv"
    reexported.write_bytes(csv.read_bytes().replace(b"\n", b"\r\n"))
    fps = [
        dataset_fingerprint(csv, schema),
        dataset_fingerprint(csv, commented),
        dataset_fingerprint(reexported, schema),
    ]
    assert len(set(fps)) == 3  # each would have opened a fresh account before issue 13
    return fps


def test_schema_comment_and_reexport_do_not_reset_the_budget(tmp_path: Path) -> None:
    fps = _versions(tmp_path)
    one = epsilon([EVENT], DELTA, "prv")
    two = epsilon([EVENT, EVENT], DELTA, "prv")
    budget = PrivacyBudget((one + two) / 2, DELTA)  # room for one round, not two
    with SitePrivacyLedger.open(tmp_path / "ledgers" / "site-a.sqlite") as ledger:
        record_round(ledger, fps[0], budget, EVENT, run_id="r1", round=1, clip_norm=1.0)
        for fp in fps[1:]:
            decision = check_round(ledger, fp, budget, EVENT)
            assert not decision.allowed and decision.epsilon_after == pytest.approx(two)
            with pytest.raises(BudgetExhaustedError):
                record_round(ledger, fp, budget, EVENT, run_id="r2", round=1, clip_norm=1.0)
        assert len(ledger.entries()) == 1


def test_lifetime_epsilon_tracks_pld_over_every_release(tmp_path: Path) -> None:
    fps = _versions(tmp_path)
    events = [
        EVENT,
        PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.3, steps=50),
        PoissonGaussianEvent(sample_rate=0.1, noise_multiplier=2.0, steps=5),
    ]
    with SitePrivacyLedger.open(tmp_path / "site-a.sqlite") as ledger:
        for k, (fp, event) in enumerate(zip(fps, events, strict=True), start=1):
            entry = ledger.record("r", k, event, 1.0, DELTA, fp)
            pld = epsilon(events[:k], DELTA, "pld")
            assert entry.epsilon_after >= pld * (1 - 1e-9)  # never below the PLD bound
            assert entry.epsilon_after <= pld * 1.01
        assert ledger.lifetime_epsilon() == entry.epsilon_after
