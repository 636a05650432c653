"""Issue 17c: check, commit, plan, spent_now and report agree on the accountant.

One accountant per account and delta, around PLD_MIN_DELTA and the 8-mechanism limit, and
none is below the one-shot PLD.

Run: .venv/bin/python docs/attacks/scripts/issue17c_accountants.py (about a minute)
"""

import tempfile
from pathlib import Path

from fedsafe.client.privacy_state import SiteAccount
from fedsafe.privacy.accounting import PLD_MIN_DELTA, epsilon_full_composition
from fedsafe.privacy.budget import PrivacyBudget, check_round, plan_noise, record_round
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.reporting.report_data import lifetime_now

FP = "f" * 64


def main() -> None:
    """Ten distinct mechanisms recorded at each delta; every figure compared."""
    worst = float("inf")
    for delta in (PLD_MIN_DELTA / 2, PLD_MIN_DELTA, 1e-5):
        budget = PrivacyBudget(100.0, delta)
        with tempfile.TemporaryDirectory() as tmp:
            ledger = SitePrivacyLedger.open(Path(tmp) / "l.sqlite")
            events: list[PoissonGaussianEvent] = []
            for i in range(10):
                event = PoissonGaussianEvent(0.02, 1.0 + 0.05 * i, 5)
                decision = check_round(ledger, FP, budget, event, "prv")
                plan = plan_noise(budget, events, 0.02, 5, 3, "prv") if i == 9 else None
                entry = record_round(
                    ledger, FP, budget, event, run_id="r", round=i + 1, clip_norm=1.0
                )
                events.append(event)
                check_acc = decision.reason.rsplit("(", 1)[1].rstrip(")")
                assert check_acc == entry.accountant, (delta, i, check_acc, entry.accountant)
                assert decision.epsilon_after == entry.epsilon_after, (delta, i)
                account = SiteAccount(ledger, FP, budget, delta, "prv", [])
                now = account.spent_now()
                report = lifetime_now(tuple(ledger.entries()), delta)
                ref = epsilon_full_composition(events, delta, "pld")
                for name, value in (
                    ("commit", entry.epsilon_after),
                    ("spent_now", now),
                    ("report", report),
                ):
                    assert value >= ref * (1 - 1e-8), (delta, i, name, value, ref)
                    worst = min(worst, value / ref)
                print(
                    f"delta {delta:g} entry {i + 1}: {entry.accountant} "
                    f"{entry.epsilon_after:.6f} check {check_acc} spent_now {now:.6f} "
                    f"report {report:.6f} one-shot PLD {ref:.6f} "
                    f"plan {plan.accountant if plan else '-'}"
                )
            ledger.close()
    print(f"smallest ratio to the one-shot PLD: {worst:.9f}")


if __name__ == "__main__":
    main()
