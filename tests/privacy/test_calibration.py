"""Calibration and cross-checks of the ledger's epsilon against an independent accountant."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.calibration import calibrate_noise_multiplier
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
