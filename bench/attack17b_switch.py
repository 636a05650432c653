"""Attack (issue 17b): an account crossing 8 distinct mechanisms, PRV -> PLD, mid-life.

Records eight runs' mechanisms (distinct noise, as a coordinator choosing a different
target-epsilon per run makes them), then a ninth tiny one, into a real ledger, and prints each
entry's epsilon_after and accountant, the ledger's lifetime (max), and what the ninth commit
and a budget check admit under PLD that PRV would refuse.

    .venv/bin/python bench/attack17b_switch.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedsafe.privacy.accounting import epsilon, epsilon_full_composition
from fedsafe.privacy.budget import PrivacyBudget, check_round
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.fingerprint import fingerprint_bytes
from fedsafe.privacy.ledger import SitePrivacyLedger

DELTA = 1e-5
FP = fingerprint_bytes(b"records", b"schema")


def main() -> None:
    runs = [PoissonGaussianEvent(0.02, 1.0 + 0.05 * i, 50) for i in range(8)]
    ninth = PoissonGaussianEvent(0.02, 5.0, 1)
    with (
        tempfile.TemporaryDirectory() as tmp,
        SitePrivacyLedger.open(Path(tmp) / "l.sqlite") as ledger,
    ):
        for i, e in enumerate([*runs, ninth]):
            entry = ledger.record(f"run-{i}", 1, e, 1.0, DELTA, FP, "prv")
            print(f"entry {i + 1}: {entry.accountant} epsilon_after {entry.epsilon_after:.6f}")
        entries = ledger.entries()
        print(f"ledger lifetime (max epsilon_after) {ledger.lifetime_epsilon():.6f}")
        events = [e.event for e in entries]
        prv = epsilon(events, DELTA, "prv")
        pld_each = epsilon_full_composition(events, DELTA, "pld")
        print(
            f"9 events: PRV {prv:.6f}, one-shot PLD {pld_each:.6f}, "
            f"recorded {entries[-1].epsilon_after:.6f}"
        )
        cap = (prv + entries[-1].epsilon_after) / 2
        decision = check_round(ledger, FP, PrivacyBudget(cap, DELTA), ninth, "prv")
        print(
            f"budget {cap:.6f} (between the PLD and PRV values): another ninth-like round "
            f"allowed={decision.allowed} at {decision.epsilon_after:.6f}; "
            f"PRV of the same: {epsilon([*events, ninth], DELTA, 'prv'):.6f}"
        )


if __name__ == "__main__":
    main()
