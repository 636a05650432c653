"""Kept Rényi divergences: Opacus's RDP and PRV epsilons, bit for bit, each pair computed once."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsafe.privacy import rdp_memo
from fedsafe.privacy.accounting import epsilon_full_composition
from fedsafe.privacy.events import PoissonGaussianEvent

CASES = [
    ([(0.6875, 0.0125, 6)], 1e-4),  # one MNIST site's planned run
    ([(1.1, 0.02, 50), (0.9, 0.01, 12), (2.0, 0.3, 3)], 1e-5),  # a shared account
    ([(0.8, 1.0, 4)], 1e-5),  # full batch
]


@pytest.mark.parametrize(("history", "delta"), CASES)
def test_prv_and_rdp_equal_opacus_exactly(
    history: list[tuple[float, float, int]], delta: float
) -> None:
    prv = PRVAccountant()
    prv.history = list(history)
    rdp = RDPAccountant()
    rdp.history = list(history)
    expected_prv = float(prv.get_epsilon(delta=delta))
    # Twice: computed, then from the kept divergences.
    assert rdp_memo.prv_epsilon(history, delta) == expected_prv
    assert rdp_memo.prv_epsilon(history, delta) == expected_prv
    assert rdp_memo.rdp_epsilon(history, delta) == float(rdp.get_epsilon(delta=delta))


def test_each_mechanism_is_computed_once_per_process() -> None:
    rdp_memo.clear()
    history = [(1.1, 0.02, 50), (0.9, 0.01, 12)]
    rdp_memo.prv_epsilon(history, 1e-5)
    assert rdp_memo.one_step_rdp.cache_info().misses == 2
    # Another delta, more steps, the RDP accountant: the same two mechanisms, no new work.
    rdp_memo.prv_epsilon([(1.1, 0.02, 80), (0.9, 0.01, 12)], 1e-4)
    rdp_memo.rdp_epsilon(history, 1e-6)
    assert rdp_memo.one_step_rdp.cache_info().misses == 2
    with pytest.raises(ValueError, match="read-only"):
        rdp_memo.one_step_rdp(0.02, 1.1)[0] = 0.0


def test_fedsafe_accounting_goes_through_it_and_stays_above_pld() -> None:
    events = [PoissonGaussianEvent(0.0125, 0.6875, 6), PoissonGaussianEvent(0.0285, 0.85, 6)]
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    prv = PRVAccountant()
    prv.history = history
    assert epsilon_full_composition(events, 1e-4, "prv") == float(prv.get_epsilon(delta=1e-4))
    assert epsilon_full_composition(events, 1e-4, "prv") >= epsilon_full_composition(
        events, 1e-4, "pld"
    )


def test_empty_history_spends_nothing() -> None:
    assert rdp_memo.prv_epsilon([], 1e-5) == 0.0
    assert rdp_memo.rdp_epsilon([], 1e-5) == 0.0
