"""Incremental PLD: never below the one-shot composition, and only the new events composed."""

from __future__ import annotations

import random

import pytest

from fedsafe.privacy import incremental_pld
from fedsafe.privacy.accounting import (
    PRV_MECHANISM_LIMIT,
    Composition,
    account_accountant,
    account_epsilon,
    epsilon,
    epsilon_full_composition,
)
from fedsafe.privacy.events import PoissonGaussianEvent


@pytest.fixture(autouse=True)
def _cold() -> None:
    incremental_pld.clear()


def _one_shot(composition: Composition, delta: float) -> float:
    return epsilon_full_composition(list(composition.mechanisms), delta, "pld")


def test_every_prefix_of_a_growing_account_is_at_least_the_one_shot_composition() -> None:
    """Commits in a random order onto kept prefixes, as an account shared by sites grows."""
    rng = random.Random(3)
    mechanisms = [(rng.uniform(0.002, 0.3), rng.uniform(0.6, 4.0)) for _ in range(6)]
    events: list[PoissonGaussianEvent] = []
    for _ in range(14):
        q, sigma = rng.choice(mechanisms)
        events.append(PoissonGaussianEvent(q, sigma, rng.choice([1, 2, 10, 200])))
        composition = Composition.of(events)
        for delta in (1e-7, 1e-4):
            fast = incremental_pld.pld_epsilon(composition, delta)
            slow = _one_shot(composition, delta)
            assert fast >= slow
            # The margin and the slack (about 2e-7 relative at delta 1e-7, attack 17b).
            assert fast <= slow * (1 + 1e-6)


def test_only_the_new_events_are_composed_onto_the_kept_prefix() -> None:
    a = PoissonGaussianEvent(0.01, 1.1, 6)
    b = PoissonGaussianEvent(0.02, 0.9, 4)
    incremental_pld.distribution(Composition.of([a, b]))
    before = incremental_pld._mechanism.cache_info()
    incremental_pld.distribution(Composition.of([a, b, PoissonGaussianEvent(0.01, 1.1, 2)]))
    after = incremental_pld._mechanism.cache_info()
    # One new mechanism built (a's 2 extra steps), nothing recomposed from scratch.
    assert after.misses - before.misses == 1
    assert after.hits == before.hits


def test_the_same_composition_is_returned_from_the_keep_without_composing() -> None:
    c = Composition.of([PoissonGaussianEvent(0.05, 1.3, 3)])
    first = incremental_pld.distribution(c)
    assert incremental_pld.distribution(c) is first


def test_pld_through_the_accounting_memo_is_incremental_and_not_below_one_shot() -> None:
    events = [PoissonGaussianEvent(0.01 + 0.001 * i, 1.0 + 0.05 * i, 2) for i in range(12)]
    for n in range(1, len(events) + 1):
        assert epsilon(events[:n], 1e-5, "pld") >= _one_shot(Composition.of(events[:n]), 1e-5)


def test_prv_gives_way_to_pld_beyond_the_mechanism_limit() -> None:
    many = Composition.of(
        PoissonGaussianEvent(0.01, 1.0 + 0.01 * i, 1) for i in range(PRV_MECHANISM_LIMIT + 1)
    )
    few = Composition.of(many.mechanisms[:PRV_MECHANISM_LIMIT])
    assert account_accountant(few, "prv") == "prv"
    assert account_accountant(many, "prv") == "pld"
    assert account_accountant(many, "rdp") == "rdp"  # cheap already: kept divergences
    eps, name = account_epsilon(many.mechanisms, 1e-5, "prv")
    assert name == "pld"
    assert eps >= _one_shot(many, 1e-5)
    with pytest.raises(ValueError, match="unknown accountant"):
        account_accountant(many, "moments")


def test_an_account_of_many_one_step_events_is_not_below_them_composed_one_by_one() -> None:
    """dp_accounting adds truncation mass per event: at delta 1e-10 it moves epsilon (17b)."""
    events = [
        PoissonGaussianEvent(0.01 + 0.001 * (i % 10), 1.0 + 0.02 * (i % 10), 1) for i in range(60)
    ]
    eps, name = account_epsilon(events, 1e-10, "prv")
    assert name == "pld"
    # Without the truncation slack this was 3.5e-5 (relative) below the one-by-one composition.
    one_by_one = epsilon_full_composition(events, 1e-10, "pld")
    assert one_by_one <= eps <= one_by_one * (1 + 1e-3)
    # The merged composition is below the one-by-one composition: the slack covers the events.
    assert _one_shot(Composition.of(events), 1e-10) < one_by_one


def test_a_slack_as_large_as_delta_gives_no_finite_epsilon() -> None:
    c = Composition.of([PoissonGaussianEvent(0.01, 1.0, 1)])
    tiny = 10 * incremental_pld.TRUNCATION_SLACK
    assert incremental_pld.pld_epsilon(c, tiny, events=10) == float("inf")
    assert incremental_pld.pld_epsilon(c, 1e-5, events=10) < float("inf")


def test_an_account_stated_at_a_tiny_delta_keeps_prv() -> None:
    """Below PLD_MIN_DELTA the per-event slack would cost percents or make epsilon infinite."""
    from fedsafe.privacy.accounting import PLD_MIN_DELTA

    many = Composition.of(
        PoissonGaussianEvent(0.01, 1.0 + 0.01 * i, 1) for i in range(PRV_MECHANISM_LIMIT + 1)
    )
    assert account_accountant(many, "prv", PLD_MIN_DELTA / 10) == "prv"
    assert account_accountant(many, "prv", PLD_MIN_DELTA) == "pld"
    eps, name = account_epsilon(many.mechanisms, 1e-12, "prv")
    assert name == "prv" and eps == epsilon(many.mechanisms, 1e-12, "prv")
