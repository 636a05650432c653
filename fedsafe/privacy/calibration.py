"""Noise calibration: the smallest noise multiplier whose total epsilon stays within a target.

Calibration is a bisection over fresh accountants that keeps the conservative side, as in
``dp_accounting.mechanism_calibration`` (Google) and Opacus's ``get_noise_multiplier``. The
planned steps are composed with every event already spent (``prior``), so a site's lifetime
budget is respected across runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    prior: Sequence[PoissonGaussianEvent] = (),
    accountant: str = "prv",
    rel_tolerance: float = 0.005,
    max_noise: float = 1e4,
) -> float:
    """Smallest noise multiplier so that ``prior`` plus ``steps`` new steps spend <= target.

    Parameters
    ----------
    target_epsilon
        Total epsilon allowed after the planned steps (prior spending included).
    delta
        Delta of the guarantee.
    sample_rate
        Poisson sampling rate of the planned steps.
    steps
        Number of planned noisy steps.
    prior
        Events already spent on the same data.
    accountant
        Accountant used to measure epsilon.
    rel_tolerance
        Bisection stops when the achieved epsilon is within this fraction below the target.
    max_noise
        Upper end of the search.

    Returns
    -------
    float
        A noise multiplier ``sigma`` with ``epsilon(prior + [event(sigma)]) <= target_epsilon``.

    Raises
    ------
    ValueError
        If the target is not positive, or the prior spending alone already reaches it.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    prior = list(prior)
    if prior and epsilon(prior, delta, accountant) >= target_epsilon:
        raise ValueError("the events already spent reach the target epsilon: no budget is left")

    def eps_at(sigma: float) -> float:
        return epsilon([*prior, PoissonGaussianEvent(sample_rate, sigma, steps)], delta, accountant)

    low, high = 0.0, 1.0
    eps_high = eps_at(high)
    while eps_high > target_epsilon:
        low, high = high, high * 2
        if high > max_noise:
            raise ValueError(
                f"no noise multiplier below {max_noise} reaches epsilon {target_epsilon}"
            )
        eps_high = eps_at(high)
    # Invariant: eps_at(high) <= target; eps_at(low) > target (or low == 0).
    for _ in range(60):
        if eps_high >= target_epsilon * (1 - rel_tolerance):
            break
        mid = (low + high) / 2
        eps_mid = eps_at(mid)
        if eps_mid > target_epsilon:
            low = mid
        else:
            high, eps_high = mid, eps_mid
    return high
