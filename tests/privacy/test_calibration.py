"""Calibration and cross-checks of the ledger's epsilon against an independent accountant."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.calibration import _calibrate, calibrate_noise_multiplier, clear_cache
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger


@pytest.mark.parametrize(
    ("accountant", "target", "q", "steps"),
    [("prv", 1.0, 0.02, 1500), ("rdp", 3.0, 0.01, 800), ("pld", 0.5, 0.05, 200)],
)
def test_calibrated_noise_is_within_two_percent_below_target(
    accountant: str, target: float, q: float, steps: int
) -> None:
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, accountant=accountant)
    achieved = epsilon([PoissonGaussianEvent(q, sigma, steps)], 1e-5, accountant)
    assert achieved <= target
    assert achieved >= 0.98 * target


@settings(max_examples=5, deadline=None)
@given(
    target=st.floats(0.3, 8.0),
    q=st.floats(0.005, 0.2),
    steps=st.integers(1, 500),
    prior_sigma=st.floats(3.0, 10.0),
)
def test_calibration_property_rdp(target: float, q: float, steps: int, prior_sigma: float) -> None:
    prior = [PoissonGaussianEvent(q, prior_sigma, 10)]
    if epsilon(prior, 1e-5, "rdp") >= target:
        return
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, prior=prior, accountant="rdp")
    achieved = epsilon([*prior, PoissonGaussianEvent(q, sigma, steps)], 1e-5, "rdp")
    assert achieved <= target
    assert achieved >= 0.98 * target


@settings(max_examples=4, deadline=None)
@given(
    target=st.floats(0.5, 6.0),
    q=st.floats(0.005, 0.1),
    steps=st.integers(20, 800),
    prior=st.lists(
        st.tuples(st.floats(0.005, 0.1), st.floats(2.0, 8.0), st.integers(1, 200)), max_size=3
    ),
)
def test_calibration_property_prv_exact_accountant_accepts_the_noise(
    target: float, q: float, steps: int, prior: list[tuple[float, float, int]]
) -> None:
    """The noise found through the RDP bracket is measured by PRV at or below the target."""
    spent = [PoissonGaussianEvent(*p) for p in prior]
    if epsilon(spent, 1e-5, "prv") >= 0.9 * target:
        return
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, prior=spent, rel_tolerance=0.002)
    achieved = epsilon([*spent, PoissonGaussianEvent(q, sigma, steps)], 1e-5, "prv")
    assert achieved <= target
    assert achieved >= 0.998 * target


def test_identical_plans_are_calibrated_once_and_keyed_by_everything() -> None:
    clear_cache()
    plan = {"delta": 1e-5, "sample_rate": 0.04, "steps": 120}
    first = calibrate_noise_multiplier(2.0, **plan)
    assert calibrate_noise_multiplier(2.0, **plan) == first
    assert _calibrate.cache_info().hits == 1
    # prior spending, another accountant or another target are other plans
    spent = [PoissonGaussianEvent(0.04, 3.0, 50)]
    with_prior = calibrate_noise_multiplier(2.0, **plan, prior=spent)
    assert with_prior > first
    assert epsilon([*spent, PoissonGaussianEvent(0.04, with_prior, 120)], 1e-5) <= 2.0
    assert calibrate_noise_multiplier(2.0, **plan, accountant="rdp") > first
    assert calibrate_noise_multiplier(1.0, **plan) > first
    assert _calibrate.cache_info().hits == 1
    with pytest.raises(ValueError, match="no budget is left"):
        calibrate_noise_multiplier(0.1, **plan, prior=spent)


def test_ledger_epsilon_matches_dp_accounting_pld(tmp_path: Path) -> None:
    """The ledger's (PRV) epsilon equals Google's PLD accountant within 1%."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    delta = 1e-5
    events = [
        PoissonGaussianEvent(0.02, 1.1, 100),
        PoissonGaussianEvent(0.02, 1.1, 100),
        PoissonGaussianEvent(0.04, 1.5, 60),
    ]
    with SitePrivacyLedger.open(tmp_path / "l.sqlite") as ledger:
        for r, ev in enumerate(events, start=1):
            last = ledger.record("run", r, ev, 1.0, delta, "sha256:d", accountant="prv")
        spent = ledger.spent("sha256:d", delta, "prv")
    assert spent == pytest.approx(last.epsilon_after)

    reference = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for ev in events:
        reference.compose(
            dp_accounting.PoissonSampledDpEvent(
                ev.sample_rate, dp_accounting.GaussianDpEvent(ev.noise_multiplier)
            ),
            ev.steps,
        )
    pld_eps = reference.get_epsilon(delta)
    assert last.epsilon_after == pytest.approx(pld_eps, rel=0.01)


def test_target_below_the_rdp_floor_is_still_calibrated_by_the_exact_accountant() -> None:
    """RDP cannot certify epsilon 0.05 at delta 1e-5 (its floor is 0.103 there); PLD can."""
    with pytest.raises(ValueError, match="no noise multiplier"):
        calibrate_noise_multiplier(0.05, 1e-5, 0.001, 10, accountant="rdp")
    sigma = calibrate_noise_multiplier(0.05, 1e-5, 0.001, 10, accountant="pld")
    achieved = epsilon([PoissonGaussianEvent(0.001, sigma, 10)], 1e-5, "pld")
    assert 0.995 * 0.05 <= achieved <= 0.05


def test_neighbouring_plans_start_from_each_other_and_land_within_the_unhinted_band() -> None:
    """Sites differing only in their sample rate: the hinted search's noise is measured at or
    below the target, and its epsilon is within 0.5% of the unhinted search's (main's path)."""
    from fedsafe.privacy import calibration

    rates = [0.0125, 0.0286, 0.0076]
    unhinted = {}
    for q in rates:
        clear_cache()
        unhinted[q] = calibrate_noise_multiplier(1.0, 1e-4, q, 6)
    clear_cache()
    evaluations: list[float] = []
    real = calibration.epsilon

    def counted(events, delta, accountant="prv"):  # type: ignore[no-untyped-def]
        evaluations.append(events[-1].noise_multiplier)
        return real(events, delta, accountant)

    calibration.epsilon = counted  # type: ignore[assignment]
    try:
        hinted = {q: calibrate_noise_multiplier(1.0, 1e-4, q, 6) for q in rates}
    finally:
        calibration.epsilon = real  # type: ignore[assignment]
    assert hinted[rates[0]] == unhinted[rates[0]]  # the first plan has no neighbour
    for q in rates[1:]:
        achieved = epsilon([PoissonGaussianEvent(q, hinted[q], 6)], 1e-4, "prv")
        assert 0.995 * (1 - 0.0025) <= achieved <= 0.99875  # middle of [0.995, 1]
        reference = epsilon([PoissonGaussianEvent(q, unhinted[q], 6)], 1e-4, "prv")
        assert 0.995 <= reference <= 1.0
        assert abs(achieved - reference) <= 0.005 * reference
    # the neighbours need far fewer measurements than the first plan's RDP bracket + search
    assert len(evaluations) <= 8 + 2 * 4


def test_a_nan_epsilon_is_never_taken_for_within_the_target() -> None:
    """An accountant answering NaN (or inf) for some noise: the search treats it as over."""
    from fedsafe.privacy.calibration import _search

    def eps_at(sigma: float) -> float:
        return math.nan if sigma < 2.0 else 1.0 / sigma

    sigma, _ = _search(eps_at, 0.4, 0.005, 1.0, 1e4)
    assert math.isfinite(eps_at(sigma)) and 0.4 * 0.995 <= eps_at(sigma) <= 0.4


def test_an_accountant_out_of_memory_counts_as_over_the_target() -> None:
    """PRV's grid at a tiny noise may not fit in memory: the search moves to more noise."""
    from fedsafe.privacy.calibration import _search

    def eps_at(sigma: float) -> float:
        if sigma < 0.5:  # where an absurd target (epsilon 1000) would take PRV
            raise MemoryError("Unable to allocate 725. MiB for an array")
        return 50.0 / sigma

    sigma, _ = _search(eps_at, 1000.0, 0.005, 0.01, 1e4)
    assert sigma >= 0.5 and eps_at(sigma) <= 1000.0


def test_a_downward_bracketing_step_lowers_the_noise_by_a_bounded_factor() -> None:
    """Epsilon falling as sigma^-6 from far above: the 1 / sigma model would step 60x down."""
    from fedsafe.privacy.calibration import MAX_DOWN_STEP, _search

    measured: list[float] = []

    def eps_at(sigma: float) -> float:
        measured.append(sigma)
        return (0.38 / sigma) ** 6

    sigma, _ = _search(eps_at, 1.0, 0.005, 0.69, 1e4)
    assert 0.995 <= eps_at(sigma) <= 1.0
    assert measured[1] == pytest.approx(0.69 / MAX_DOWN_STEP)
    assert min(measured) >= 0.38 / MAX_DOWN_STEP


def test_the_first_calibration_of_a_small_sample_rate_never_measures_a_far_too_small_noise() -> (
    None
):
    """MNIST's 10-site plan (batch 4, about 6,000 records, 6 steps, epsilon 1): the RDP bracket
    ends far above the answer, and a PRV evaluation far below it costs seconds (epsilon 702 at
    sigma 0.018). Every noise the exact accountant measures stays within a factor 2 of the
    answer, and the answer is in the unhinted band."""
    from fedsafe.privacy import calibration

    clear_cache()
    measured: list[float] = []
    real = calibration.epsilon

    def recorded(events, delta, accountant="prv"):  # type: ignore[no-untyped-def]
        if accountant == "prv":
            measured.append(events[-1].noise_multiplier)
        return real(events, delta, accountant)

    calibration.epsilon = recorded  # type: ignore[assignment]
    try:
        sigma = calibrate_noise_multiplier(1.0, 1e-4, 1 / 1500, 6)
    finally:
        calibration.epsilon = real  # type: ignore[assignment]
        clear_cache()
    achieved = epsilon([PoissonGaussianEvent(1 / 1500, sigma, 6)], 1e-4, "prv")
    assert 0.995 <= achieved <= 1.0
    assert min(measured) >= sigma / 2
