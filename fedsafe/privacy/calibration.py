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
evaluations instead of a bisection's dozen. A step that lowers the noise while bracketing is
capped (:data:`MAX_DOWN_STEP`): an exact evaluation far below the answer measures a huge epsilon
over a huge domain (seconds each, issue 17). Identical plans are calibrated once per process;
the cached noise is the one the exact accountant accepted for exactly that plan.

Neighbouring plans (issue 17): the sites a simulation worker holds calibrate plans that differ
only in their sample rate (each site's public size). After the first, a plan with the same
target, delta, steps, accountant and prior starts from the nearest calibrated neighbour instead
of the RDP bracket: its noise scaled by ``(q / q') ** k`` (``k`` fitted on the neighbours,
0.25 until two are known), with its measured slope of ``log epsilon`` against ``log sigma`` for
Newton steps: one to three exact evaluations instead of about five RDP and five exact ones. The
start is only a guess; the search is aimed at about ``[(1 - 0.75 rel) target, (1 - 0.25 rel)
target]`` (``rel = rel_tolerance``), the middle of the unhinted search's band ``[(1 - rel)
target, target]``, and measured by the exact accountant: its epsilon is at most the target and
within ``0.75 rel`` of what the unhinted search would return for the same plan (so a run's
epsilons agree with the unhinted path's within 0.5%; the noise may be a little larger or
smaller than that path's, both measured at or below the target).
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
#: Largest factor by which the first bracketing step lowers the noise (the k-th: its
#: ``2 ** (k - 1)``-th power, so a far start is still bracketed in a few steps). The PRV
#: accountant's domain is bounded by the RDP epsilon at the measured noise, so a noise far
#: below the answer costs seconds: at ``q = 1/1500``, 6 steps, target 1, the RDP bracket ends
#: at 0.69 (PRV epsilon 0.027) and the ``1 / sigma`` step then measured 0.018 (epsilon 702,
#: 18.6 s of CPU against 0.1 s near the answer, 0.38); with the cap it measures 0.34.
MAX_DOWN_STEP = 2.0
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

    hint_key = (target, delta, steps, prior, accountant, rel_tolerance, max_noise)
    start = _neighbour_start(hint_key, sample_rate)
    if start is not None:
        # Aimed at the middle of the unhinted search's band, [1 - 0.75 rel, 1 - 0.25 rel]
        # (about) times the target, measured by the exact accountant: its epsilon is within
        # 0.75 rel of whatever the unhinted search would have returned, and at most the target.
        try:
            sigma, slope = _search(
                at(accountant),
                target * (1.0 - rel_tolerance / 4),
                rel_tolerance / 2,
                start[0],
                max_noise,
                start[1],
            )
        except ValueError:
            pass  # that narrower band is out of reach: the unhinted search below decides
        else:
            _remember(hint_key, sample_rate, sigma, slope)
            return sigma
    guess = 1.0
    if accountant != "rdp":
        # RDP is an upper bound on the same mechanism, so its noise is close above the exact
        # one; its cost does not grow with ``steps``.
        with warnings.catch_warnings():
            # Opacus warns when the bound's best order is its largest: harmless for a guess.
            warnings.simplefilter("ignore", UserWarning)
            try:
                guess = _search(at("rdp"), target, 0.02, 1.0, max_noise)[0]
            except ValueError:
                # RDP's bound has a floor (its largest order) that a tighter accountant can
                # go below: search from the default start instead.
                guess = 1.0
    sigma, slope = _search(at(accountant), target, rel_tolerance, guess, max_noise)
    _remember(hint_key, sample_rate, sigma, slope)
    return sigma


#: Calibrated neighbours per plan without its sample rate: (sample rate, noise, slope).
_NEIGHBOURS: dict[tuple[object, ...], list[tuple[float, float, float | None]]] = {}
_DEFAULT_RATE_EXPONENT = 0.25


def _remember(
    key: tuple[object, ...], sample_rate: float, sigma: float, slope: float | None
) -> None:
    known = _NEIGHBOURS.setdefault(key, [])
    known.append((sample_rate, sigma, slope))
    if len(known) > 16:
        del known[0]
    if len(_NEIGHBOURS) > 64:
        _NEIGHBOURS.pop(next(iter(_NEIGHBOURS)))


def _neighbour_start(
    key: tuple[object, ...], sample_rate: float
) -> tuple[float, float | None] | None:
    """A start (noise, slope) from calibrated plans that differ only in the sample rate."""
    known = [k for k in _NEIGHBOURS.get(key, ()) if k[1] > MIN_NOISE and k[0] != sample_rate]
    if not known:
        return None
    q0, sigma0, slope0 = min(known, key=lambda k: abs(math.log(k[0] / sample_rate)))
    exponent = _DEFAULT_RATE_EXPONENT
    spread = [k for k in known if abs(math.log(k[0] / q0)) > 0.05]
    if spread:
        q1, sigma1, _ = max(spread, key=lambda k: abs(math.log(k[0] / q0)))
        fitted = math.log(sigma1 / sigma0) / math.log(q1 / q0)
        if 0.0 < fitted < 1.0:
            exponent = fitted
    slopes = [k[2] for k in known if k[2] is not None]
    slope = slope0 if slope0 is not None else (slopes[-1] if slopes else None)
    return sigma0 * (sample_rate / q0) ** exponent, slope


def _search(
    eps_at: Callable[[float], float],
    target: float,
    rel_tolerance: float,
    guess: float,
    max_noise: float,
    slope: float | None = None,
) -> tuple[float, float | None]:
    """Noise with ``target * (1 - rel_tolerance) <= eps_at(noise) <= target``, conservative.

    Invariant: ``eps_at(high) <= target`` was measured; ``eps_at(low) > target`` was measured
    (an evaluation that raises ``MemoryError`` counts as over the target).
    Only a measured ``high`` is returned, with the slope of ``log eps`` against ``log sigma``
    between the last two measurements (None after one). ``slope`` (negative, measured on a
    neighbouring plan) makes the steps that open the bracket Newton steps on it; without it,
    epsilon is taken as ``1 / sigma`` and each step overshoots by 2% (at least 5%).
    """
    steepness, over, least = 1.0, 1.02, 1.05
    if slope is not None and math.isfinite(slope) and slope < 0:
        steepness, over, least = min(max(-slope, 0.25), 8.0), 1.0, 1.001
    points: list[list[float]] = []
    floor = target * (1.0 - rel_tolerance)
    aim = math.log(target * (1.0 - rel_tolerance / 2))
    # Each end: [sigma, log sigma, log eps - aim]; the root of the last is the aim.
    low: list[float] | None = None
    high: list[float] | None = None
    sigma = min(max(guess, MIN_NOISE), max_noise)
    last_side = 0
    stride = 1.0
    for _ in range(_MAX_EVALUATIONS):
        try:
            eps = eps_at(sigma)
        except MemoryError:
            # PRV's grid grows as the noise shrinks: at a tiny noise (an absurd target such as
            # epsilon 1000) it may not fit in memory. Unmeasured counts as over the target,
            # so the search moves to more noise and only a measured noise is returned.
            eps = math.inf
        if not math.isfinite(eps):
            eps = math.inf  # NaN or inf: never taken for "within the target"
        point = [sigma, math.log(sigma), math.log(max(min(eps, 1e300), 1e-300)) - aim]
        points.append(point[:])
        if eps > target:
            if sigma >= max_noise:
                break
            low, side = point, -1
        elif eps >= floor or sigma <= MIN_NOISE:
            return sigma, _last_slope(points)
        else:
            high, side = point, 1
        if low is None or high is None:
            # Bracket by stepping: epsilon falls roughly as 1 / sigma, so step by the ratio,
            # with a stride that doubles (in log) while the bracket is still open.
            ratio = math.exp(point[2] * stride / steepness)
            ratio = max(ratio * over, least) if high is None else min(ratio / over, 1 / least)
            # Downwards, at most a factor MAX_DOWN_STEP ** stride: an exact evaluation's cost
            # grows with the epsilon it measures, and the 1 / sigma model overshoots where
            # epsilon falls faster (see MAX_DOWN_STEP).
            ratio = max(ratio, MAX_DOWN_STEP**-stride)
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
    return high[0], _last_slope(points)


def _last_slope(points: list[list[float]]) -> float | None:
    """Slope of ``log eps`` against ``log sigma`` between the last two measured points."""
    if len(points) < 2 or points[-1][1] == points[-2][1]:
        return None
    slope = (points[-1][2] - points[-2][2]) / (points[-1][1] - points[-2][1])
    return slope if slope < 0 else None


def clear_cache() -> None:
    """Forget every calibrated plan and neighbour (benchmarks measure the first call)."""
    _calibrate.cache_clear()
    _NEIGHBOURS.clear()
