"""dp_accounting's privacy loss distributions, composed incrementally onto a kept prefix.

An account's epsilon is the composition of every event it holds. The PRV accountant recomposes
all of them at every call, so its cost grows with the number of *distinct* mechanisms: about
0.2 s for 10 and 1.5 s for 50 (BENCHMARKS.md "Incremental accounting"), paid at every commit of
an account that many sites share (the simulated MNIST sites' one account, issue 13) and at every
step of a noise search against it. Privacy loss distributions compose by convolution (Koskela,
Jälkö and Honkela, "Computing Tight Differential Privacy Guarantees Using FFT", AISTATS 2020;
Doroshenko, Ghazi, Kamath, Kumar and Manurangsi, "Connect the Dots: Tighter Discrete
Approximations of Privacy Loss Distributions", PETS 2022), so the distribution of a composition
can be kept and the next events convolved onto it: one convolution per new distinct mechanism.

Here each process keeps the composed distribution of its most recent compositions (a small LRU
of :class:`~fedsafe.privacy.accounting.Composition` -> distribution). For a new composition, the
largest kept one that it contains (every mechanism with at most as many steps) is the start, and
only the difference is composed onto it, each mechanism as dp_accounting's
``PLDAccountant`` builds it (pessimistic, connect-the-dots, Poisson-subsampled Gaussian,
add-or-remove-one neighbours, value discretization 1e-3, the same as
:func:`fedsafe.privacy.accounting.epsilon_full_composition` with ``"pld"``).

Exactness: every distribution here is a pessimistic estimate, and the convolution of pessimistic
estimates is pessimistic, so each value is an upper bound on the true epsilon whatever the order
of composition. Different orders round differently in the last digits (about 1e-10 relative
measured); the value returned is raised by :data:`ORDER_MARGIN` (relative) so that it is never
below the one-shot composition of the same events (tested against it).

Truncation: dp_accounting adds 1e-15 to the infinite loss at every ``self_compose`` and up to
1e-15 of truncated tails at every ``compose``, so the one-shot composition of an account's
events *one by one* (``epsilon_full_composition(events, delta, "pld")``, one self-composition
per event) carries up to about ``2e-15`` more mass per event than the same mechanisms merged.
At small delta that mass moves epsilon: 400 one-step events at delta 1e-10 compose to an
epsilon 2.8e-4 (relative) above their merged composition (docs/attacks/issue17b.md). So the
epsilon is read at ``delta - TRUNCATION_SLACK * (events + 1) - ROUNDOFF_SLACK``, which covers
the reference's extra mass for the number of events the account holds and the FFT round-off
that differs between orders (about 1e-13 of mass measured).
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsafe.privacy.accounting import Composition

#: dp_accounting's value discretization interval for every distribution here.
VALUE_DISCRETIZATION = 1e-3
#: Composed distributions kept per process (each about 0.1-1 MB).
KEPT = 16
#: Relative amount added to every epsilon so that no order of composition reports less than the
#: one-shot composition (measured differences: about 1e-10 relative).
ORDER_MARGIN = 1e-8
#: Probability mass per event by which the delta an epsilon is read at is lowered: twice what
#: dp_accounting's one-shot composition can add per event (1e-15 at ``self_compose``, at most
#: 1e-15 of tails at ``compose``), so that it is never below the events composed one by one.
TRUNCATION_SLACK = 4e-15
#: Probability mass by which that delta is lowered once more: FFT round-off, which differs
#: between orders of composition (``self_compose(1200)`` against three ``self_compose(400)``
#: composed: up to 1.2e-13 measured, docs/attacks/issue17b.md).
ROUNDOFF_SLACK = 5e-13

_kept: OrderedDict[Composition, Any] = OrderedDict()
_lock = threading.Lock()


@functools.lru_cache(maxsize=256)
def _mechanism(sample_rate: float, noise_multiplier: float, steps: int) -> Any:
    """The pessimistic distribution of ``steps`` self-compositions of one mechanism."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    one = pld.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=VALUE_DISCRETIZATION,
        sampling_prob=sample_rate,
    )
    return one.self_compose(steps) if steps > 1 else one


def _steps(composition: Composition) -> dict[tuple[float, float], int]:
    return {(m.sample_rate, m.noise_multiplier): m.steps for m in composition.mechanisms}


def _missing(big: Composition, small: Composition) -> list[tuple[float, float, int]]:
    have = _steps(small)
    out = []
    for m in big.mechanisms:
        extra = m.steps - have.get((m.sample_rate, m.noise_multiplier), 0)
        if extra > 0:
            out.append((m.sample_rate, m.noise_multiplier, extra))
    return out


def _start(composition: Composition) -> tuple[Composition | None, Any]:
    """The largest kept composition contained in ``composition`` and its distribution."""
    have = _steps(composition)  # once, not once per kept composition
    best: Composition | None = None
    for kept in _kept:
        contained = kept.steps <= composition.steps and all(
            have.get((m.sample_rate, m.noise_multiplier), 0) >= m.steps for m in kept.mechanisms
        )
        if contained and (best is None or kept.steps > best.steps):
            best = kept
    if best is None:
        return None, None
    _kept.move_to_end(best)
    return best, _kept[best]


def distribution(composition: Composition) -> Any:
    """The composed privacy loss distribution of ``composition`` (kept for the next call).

    Parameters
    ----------
    composition
        Non-empty; every mechanism a Poisson-subsampled Gaussian.

    Returns
    -------
    dp_accounting.pld.privacy_loss_distribution.PrivacyLossDistribution
        Pessimistic; read-only by convention (do not compose into it in place).
    """
    with _lock:
        start, pld = _start(composition)
        if start is not None and start == composition:
            return pld
        todo = (
            _missing(composition, start)
            if start is not None
            else [(m.sample_rate, m.noise_multiplier, m.steps) for m in composition.mechanisms]
        )
    for sample_rate, noise, steps in todo:
        part = _mechanism(sample_rate, noise, steps)
        pld = part if pld is None else pld.compose(part)
    with _lock:
        _kept[composition] = pld
        _kept.move_to_end(composition)
        while len(_kept) > KEPT:
            _kept.popitem(last=False)
    return pld


def pld_epsilon(composition: Composition, delta: float, events: int = 0) -> float:
    """Epsilon of ``composition`` at ``delta`` by dp_accounting's PLD, composed incrementally.

    Parameters
    ----------
    composition
        Non-empty composition of Poisson-subsampled Gaussian mechanisms.
    delta
        Target delta in (0, 1).
    events
        Number of events the composition merges (at least its number of mechanisms is
        assumed): the epsilon is read at
        ``delta - TRUNCATION_SLACK * (events + 1) - ROUNDOFF_SLACK``, so that it is not below
        those events composed one by one, in any order.

    Returns
    -------
    float
        The distribution's epsilon at that delta raised by :data:`ORDER_MARGIN` (relative):
        never below the one-shot ``PLDAccountant`` composition of the same events, merged or
        one by one. ``inf`` if the distribution has no finite epsilon, or if the slack is not
        below ``delta`` (refused by any budget: at the policy's least delta, 1e-12, beyond
        about 120 events; at 1e-11, about 2 400; at 1e-10, about 25 000).
    """
    slack = TRUNCATION_SLACK * (max(events, len(composition.mechanisms)) + 1) + ROUNDOFF_SLACK
    if slack >= delta:
        return math.inf
    eps = float(distribution(composition).get_epsilon_for_delta(delta - slack))
    if not math.isfinite(eps):
        return eps
    return max(0.0, eps) * (1.0 + ORDER_MARGIN)


def clear() -> None:
    """Forget every kept distribution (benchmarks measure a cold process with this)."""
    with _lock:
        _kept.clear()
    _mechanism.cache_clear()
