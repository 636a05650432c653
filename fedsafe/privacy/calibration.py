"""Noise calibration: the smallest noise multiplier whose total epsilon stays within a target.

Calibration is a search over the exact accountant that keeps the conservative side, as in
``dp_accounting.mechanism_calibration`` (Google) and Opacus's ``get_noise_multiplier``: the
returned noise has been measured by the exact accountant at or below the target. The planned
steps are composed with every event already spent (``prior``), so a site's lifetime budget is
respected across runs.

Cost: each exact evaluation composes every planned step (PRV, Gopi et al. NeurIPS 2021), so the
search is bracketed first with the cheap RDP bound (Mironov et al. 2019), whose cost does not
depend on the number of steps, and then narrowed by regula falsi with the Illinois rule on
``log epsilon`` against ``log sigma`` (Dowell and Jarratt, BIT 1971), a handful of exact
evaluations instead of a bisection's dozen. Identical plans are calibrated once per process;
the cached noise is the one the exact accountant accepted for exactly that plan.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

from fedsafe.privacy.accounting import Composition, check_accountant, epsilon, epsilon_of
from fedsafe.privacy.events import PoissonGaussianEvent

#: Smallest noise multiplier the search tries; below it the target is met by any noise.
MIN_NOISE = 1e-3
_MAX_EVALUATIONS = 80


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
        The search stops when the achieved epsilon is within this fraction below the target.
    max_noise
        Upper end of the search.

    Returns
    -------
    float
        A noise multiplier ``sigma`` with ``epsilon(prior + [event(sigma)]) <= target_epsilon``
        by ``accountant`` (measured, not predicted), and at least
        ``(1 - rel_tolerance) * target_epsilon`` unless ``sigma`` is at :data:`MIN_NOISE`.

    Raises
    ------
    ValueError
        If the target is not positive, the prior spending alone already reaches it, or no
        noise up to ``max_noise`` reaches it.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    if not 0.0 < rel_tolerance < 1.0:
        raise ValueError(f"rel_tolerance must be in (0, 1), got {rel_tolerance}")
    PoissonGaussianEvent(sample_rate, 1.0, steps)  # validates the plan
    return _calibrate(
        float(target_epsilon),
        float(delta),
        float(sample_rate),
        int(steps),
        Composition.of(prior),
        check_accountant(accountant),
        float(rel_tolerance),
        float(max_noise),
    )


@functools.lru_cache(maxsize=256)
def _calibrate(
    target: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Composition,
    accountant: str,
    rel_tolerance: float,
    max_noise: float,
) -> float:
    if prior and epsilon_of(prior, delta, accountant) >= target:
        raise ValueError("the events already spent reach the target epsilon: no budget is left")

    def at(name: str) -> Callable[[float], float]:
        def eps(sigma: float) -> float:
            planned = PoissonGaussianEvent(sample_rate, sigma, steps)
            return epsilon([*prior.mechanisms, planned], delta, name)

        return eps

    guess = 1.0
    if accountant != "rdp":
        # RDP is an upper bound on the same mechanism, so its noise is close above the exact
        # one; its cost does not grow with ``steps``.
        with warnings.catch_warnings():
            # Opacus warns when the bound's best order is its largest: harmless for a guess.
            warnings.simplefilter("ignore", UserWarning)
            try:
                guess = _search(at("rdp"), target, 0.02, 1.0, max_noise)
            except ValueError:
                # RDP's bound has a floor (its largest order) that a tighter accountant can
                # go below: search from the default start instead.
                guess = 1.0
    return _search(at(accountant), target, rel_tolerance, guess, max_noise)


def _search(
    eps_at: Callable[[float], float],
    target: float,
    rel_tolerance: float,
    guess: float,
    max_noise: float,
) -> float:
    """Noise with ``target * (1 - rel_tolerance) <= eps_at(noise) <= target``, conservative.

    Invariant: ``eps_at(high) <= target`` was measured; ``eps_at(low) > target`` was measured.
    Only a measured ``high`` is returned.
    """
    floor = target * (1.0 - rel_tolerance)
    aim = math.log(target * (1.0 - rel_tolerance / 2))
    # Each end: [sigma, log sigma, log eps - aim]; the root of the last is the aim.
    low: list[float] | None = None
    high: list[float] | None = None
    sigma = min(max(guess, MIN_NOISE), max_noise)
    last_side = 0
    stride = 1.0
    for _ in range(_MAX_EVALUATIONS):
        eps = eps_at(sigma)
        point = [sigma, math.log(sigma), math.log(max(eps, 1e-300)) - aim]
        if eps > target:
            if sigma >= max_noise:
                break
            low, side = point, -1
        elif eps >= floor or sigma <= MIN_NOISE:
            return sigma
        else:
            high, side = point, 1
        if low is None or high is None:
            # Bracket by stepping: epsilon falls roughly as 1 / sigma, so step by the ratio,
            # with a stride that doubles (in log) while the bracket is still open.
            ratio = math.exp(point[2] * stride)
            ratio = max(ratio * 1.02, 1.05) if high is None else min(ratio / 1.02, 1 / 1.05)
            stride *= 2
            sigma = min(max(sigma * ratio, MIN_NOISE), max_noise)
            continue
        # Illinois: halve the stale end's value when the same end moves twice in a row.
        if side == last_side == -1:
            high[2] /= 2
        elif side == last_side == 1:
            low[2] /= 2
        last_side = side
        x_lo, h_lo, x_hi, h_hi = low[1], low[2], high[1], high[2]
        x_new = x_hi - h_hi * (x_hi - x_lo) / (h_hi - h_lo)
        # Strictly inside the bracket, so every measurement shrinks it.
        left, right = sorted((x_lo, x_hi))
        margin = 0.02 * (right - left)
        sigma = math.exp(min(max(x_new, left + margin), right - margin))
    if high is None:
        raise ValueError(f"no noise multiplier below {max_noise} reaches epsilon {target}")
    return high[0]


def clear_cache() -> None:
    """Forget every calibrated plan (benchmarks measure the first call with this)."""
    _calibrate.cache_clear()
