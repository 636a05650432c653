"""Lifetime budget: per-round check across runs, and the noise plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsafe.errors import BudgetExhaustedError
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.budget import (
    BUDGET_EXHAUSTED,
    PrivacyBudget,
    check_round,
    plan_noise,
    record_round,
)
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.fingerprint import fingerprint_bytes
from fedsafe.privacy.ledger import SitePrivacyLedger

FP = fingerprint_bytes(b"site records")
ACC = "rdp"  # fast; the accountant-independent logic is what is tested here


def _client_round(
    ledger: SitePrivacyLedger,
    budget: PrivacyBudget,
    event: PoissonGaussianEvent,
    run: str,
    rnd: int,
) -> bool:
    """What the ClientApp does: check, 'train', commit, then release."""
    decision = check_round(ledger, FP, budget, event, ACC)
    if not decision.allowed:
        assert decision.reason.startswith(BUDGET_EXHAUSTED)
        return False
    record_round(ledger, FP, budget, event, run_id=run, round=rnd, clip_norm=1.0, accountant=ACC)
    return True


def test_three_runs_never_exceed_budget_and_third_is_refused_at_right_round(
    tmp_path: Path,
) -> None:
    budget = PrivacyBudget(epsilon_max=4.5, delta=1e-5)
    event = PoissonGaussianEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20)
    rounds_per_run = 6
    # The first round k (counted over all runs) whose composed epsilon exceeds the budget.
    total_allowed = (
        next(
            k for k in range(1, 100) if epsilon([event] * k, budget.delta, ACC) > budget.epsilon_max
        )
        - 1
    )
    assert 2 * rounds_per_run < total_allowed < 3 * rounds_per_run, "scenario must end in run 3"
    # Adding per-round epsilons would stop far earlier: the ledger must compose instead.
    naive_allowed = int(budget.epsilon_max // epsilon([event], budget.delta, ACC))
    assert naive_allowed < total_allowed

    trained: dict[str, list[int]] = {}
    with SitePrivacyLedger.open(tmp_path / "site.sqlite") as ledger:
        for run in ("run-1", "run-2", "run-3"):
            trained[run] = []
            for rnd in range(1, rounds_per_run + 1):
                if _client_round(ledger, budget, event, run, rnd):
                    trained[run].append(rnd)
                assert ledger.spent(FP, budget.delta, ACC) <= budget.epsilon_max
        entries = ledger.entries(FP)
    assert trained["run-1"] == trained["run-2"] == list(range(1, rounds_per_run + 1))
    expected_third = total_allowed - 2 * rounds_per_run
    assert trained["run-3"] == list(range(1, expected_third + 1))
    assert len(entries) == total_allowed
    assert max(e.epsilon_after for e in entries) <= budget.epsilon_max


def test_check_round_reports_now_and_after(tmp_path: Path) -> None:
    budget = PrivacyBudget(2.0, 1e-5)
    event = PoissonGaussianEvent(0.02, 1.0, 50)
    with SitePrivacyLedger.open(tmp_path / "l.sqlite") as ledger:
        first = check_round(ledger, FP, budget, event, ACC)
        assert first.allowed and first.epsilon_now == 0.0
        assert first.epsilon_after == pytest.approx(epsilon([event], 1e-5, ACC))
        ledger.record("r", 1, event, 1.0, 1e-5, FP, ACC)
        second = check_round(
            ledger, FP, PrivacyBudget(first.epsilon_after * 1.01, 1e-5), event, ACC
        )
        assert not second.allowed
        assert second.epsilon_now == pytest.approx(first.epsilon_after)
        assert "budget exhausted" in second.reason


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="epsilon_max"):
        PrivacyBudget(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        PrivacyBudget(1.0, 1.0)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_plan_lasts_exactly_the_planned_rounds(accountant: str) -> None:
    budget = PrivacyBudget(2.0, 1e-5)
    prior = [PoissonGaussianEvent(0.02, 2.0, 100)] * 2
    plan = plan_noise(budget, prior, 0.02, 100, 5, accountant)
    eps = plan.epsilon_after_round
    assert len(eps) == 5 and list(eps) == sorted(eps)
    assert plan.epsilon_spent == pytest.approx(epsilon(prior, 1e-5, accountant))
    assert eps[0] > plan.epsilon_spent
    assert budget.epsilon_max * 0.98 <= eps[-1] <= budget.epsilon_max
    # replaying the plan as separate round events gives the same epsilon
    replay = epsilon([*prior, *([plan.event()] * 5)], 1e-5, accountant)
    assert replay == pytest.approx(eps[-1], rel=1e-3)
    # one more round would overspend
    assert epsilon([*prior, *([plan.event()] * 6)], 1e-5, accountant) > budget.epsilon_max


def test_plan_uses_more_noise_when_budget_was_spent() -> None:
    budget = PrivacyBudget(3.0, 1e-5)
    fresh = plan_noise(budget, [], 0.02, 50, 4, ACC)
    spent = plan_noise(budget, [PoissonGaussianEvent(0.02, 1.5, 200)], 0.02, 50, 4, ACC)
    assert spent.noise_multiplier > fresh.noise_multiplier
    with pytest.raises(BudgetExhaustedError, match="budget exhausted"):
        plan_noise(PrivacyBudget(0.5, 1e-5), [PoissonGaussianEvent(0.5, 0.5, 100)], 0.02, 5, 2)


def test_two_concurrent_writers_cannot_both_spend_the_last_of_the_budget(tmp_path: Path) -> None:
    import threading

    event = PoissonGaussianEvent(0.05, 1.2, 20)
    # room for exactly 3 rounds
    budget = PrivacyBudget(
        (epsilon([event] * 3, 1e-5, ACC) + epsilon([event] * 4, 1e-5, ACC)) / 2, 1e-5
    )
    path = tmp_path / "shared.sqlite"
    SitePrivacyLedger.open(path).close()
    outcomes: list[str] = []

    def writer(name: str) -> None:
        with SitePrivacyLedger.open(path) as ledger:
            for rnd in range(1, 4):
                try:
                    record_round(
                        ledger,
                        FP,
                        budget,
                        event,
                        run_id=name,
                        round=rnd,
                        clip_norm=1.0,
                        accountant=ACC,
                    )
                    outcomes.append("ok")
                except BudgetExhaustedError:
                    outcomes.append("refused")

    threads = [threading.Thread(target=writer, args=(f"run-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 3 and outcomes.count("refused") == 3
    with SitePrivacyLedger.open(path) as ledger:
        assert len(ledger.entries()) == 3
        assert ledger.spent(FP, 1e-5, ACC) <= budget.epsilon_max


def test_a_round_composes_once_and_a_planned_run_not_at_all(tmp_path: Path) -> None:
    """Check, commit and the run's epsilon share one composition; the plan precomputes it."""
    from fedsafe.privacy.accounting import _memo_epsilon, clear_memo

    clear_memo()
    budget = PrivacyBudget(3.0, 1e-5)
    event = PoissonGaussianEvent(0.02, 1.0, 50)
    with SitePrivacyLedger.open(tmp_path / "l.sqlite") as ledger:
        decision = check_round(ledger, FP, budget, event, "prv")
        misses = _memo_epsilon.cache_info().misses
        entry = record_round(ledger, FP, budget, event, run_id="r", round=1, clip_norm=1.0,
                             accountant="prv")  # fmt: skip
        run_epsilon = epsilon([event], budget.delta, "prv")  # the run's events = the ledger's
        assert _memo_epsilon.cache_info().misses == misses
        assert entry.epsilon_after == decision.epsilon_after == run_epsilon

        plan = plan_noise(budget, ledger.events(FP), 0.02, 50, 4, "prv")
        misses = _memo_epsilon.cache_info().misses
        for rnd in range(2, 6):
            planned = plan.event()
            assert check_round(ledger, FP, budget, planned, "prv").allowed
            last = record_round(ledger, FP, budget, planned, run_id="r2", round=rnd,
                                clip_norm=1.0, accountant="prv")  # fmt: skip
            assert last.epsilon_after == pytest.approx(plan.epsilon_after_round[rnd - 2])
        assert _memo_epsilon.cache_info().misses == misses
        assert last.epsilon_after <= budget.epsilon_max


def test_a_plan_and_a_check_against_many_spent_mechanisms_use_pld_as_the_commit_will(
    tmp_path: Path,
) -> None:
    from fedsafe.privacy.accounting import PRV_MECHANISM_LIMIT, epsilon_full_composition

    prior = [
        PoissonGaussianEvent(0.01 + 0.001 * i, 1.2 + 0.02 * i, 2)
        for i in range(PRV_MECHANISM_LIMIT)
    ]
    budget = PrivacyBudget(epsilon_max=3.0, delta=1e-5)
    plan = plan_noise(budget, prior, 0.05, 2, 3, "prv")
    assert plan.accountant == "pld"  # the limit's mechanisms plus the planned one
    last = [*prior, PoissonGaussianEvent(0.05, plan.noise_multiplier, 6)]
    assert plan.epsilon_after_round[-1] <= budget.epsilon_max
    assert plan.epsilon_after_round[-1] >= epsilon_full_composition(last, 1e-5, "pld")
    assert plan.epsilon_after_round[-1] >= 0.99 * budget.epsilon_max
    with SitePrivacyLedger.open(tmp_path / "l.sqlite") as ledger:
        for e in prior:
            ledger.record("r", 1, e, 1.0, 1e-5, FP)
        decision = check_round(ledger, FP, budget, plan.event(), "prv")
        entry = record_round(ledger, FP, budget, plan.event(), run_id="r", round=2, clip_norm=1.0)
    assert decision.allowed
    assert entry.accountant == "pld"
    assert decision.epsilon_after == pytest.approx(entry.epsilon_after, rel=1e-12)


def test_crossing_to_pld_never_records_or_checks_below_the_prv_values_recorded(
    tmp_path: Path,
) -> None:
    """Attack 17b: the ninth distinct mechanism moved the account to PLD, 0.5% below PRV."""
    from fedsafe.privacy.accounting import PRV_MECHANISM_LIMIT
    from fedsafe.privacy.budget import check_round

    fp = fingerprint_bytes(b"records", b"schema")
    runs = [PoissonGaussianEvent(0.02, 1.0 + 0.05 * i, 50) for i in range(PRV_MECHANISM_LIMIT)]
    tiny = PoissonGaussianEvent(0.02, 5.0, 1)
    with SitePrivacyLedger.open(tmp_path / "l.sqlite") as ledger:
        written = [ledger.record(f"run-{i}", 1, e, 1.0, 1e-5, fp) for i, e in enumerate(runs)]
        ninth = ledger.record("run-9", 1, tiny, 1.0, 1e-5, fp)
        composed = epsilon([*runs, tiny], 1e-5, "pld")
        assert ninth.accountant == "pld"
        assert composed < written[-1].epsilon_after  # what the ninth entry recorded before
        assert ninth.epsilon_after == written[-1].epsilon_after  # the lifetime never goes down
        # A budget between the PLD composition and the recorded lifetime admits nothing more.
        cap = (composed + written[-1].epsilon_after) / 2
        decision = check_round(ledger, fp, PrivacyBudget(cap, 1e-5), tiny, "prv")
        assert not decision.allowed
        assert decision.epsilon_now == written[-1].epsilon_after
        with pytest.raises(BudgetExhaustedError):
            ledger.record("run-10", 1, tiny, 1.0, 1e-5, fp, epsilon_max=cap)
