import pytest

from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent


def test_prv_matches_independent_pld_within_one_percent():
    events = [PoissonGaussianEvent(0.02, 2.64, 100)] * 15
    prv = epsilon(events, 1e-4, "prv")
    pld = epsilon(events, 1e-4, "pld")
    assert prv == pytest.approx(pld, rel=0.01)


def test_composition_is_not_addition():
    one = [PoissonGaussianEvent(0.02, 1.0, 100)]
    e1 = epsilon(one, 1e-5)
    e2 = epsilon(one * 2, 1e-5)
    assert e1 < e2 < 2 * e1


def test_order_free_and_monotone():
    a, b = PoissonGaussianEvent(0.1, 1.0, 10), PoissonGaussianEvent(0.05, 2.0, 30)
    assert epsilon([a, b], 1e-5) == pytest.approx(epsilon([b, a], 1e-5), rel=1e-6)
    assert epsilon([a], 1e-5) < epsilon([a, b], 1e-5)
    assert epsilon([], 1e-5) == 0.0


def test_events_are_validated_on_creation():
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonGaussianEvent(0.0, 1.0, 1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        PoissonGaussianEvent(0.1, float("nan"), 1)
    with pytest.raises(ValueError, match="steps"):
        PoissonGaussianEvent(0.1, 1.0, 0)
    e = PoissonGaussianEvent(0.1, 1.0, 3)
    assert PoissonGaussianEvent.from_dict(e.to_dict()) == e
