"""Accountants: epsilon of a sequence of privacy events, recomputed from the events alone.

Epsilon is never added up across rounds or runs; the events are composed by an accountant:

- ``prv``: the Privacy Random Variable accountant of Gopi, Lee and Wutschitz, "Numerical
  Composition of Differential Privacy", NeurIPS 2021 (Opacus's ``PRVAccountant``). It returns
  the upper end of its error interval, so the reported epsilon is conservative.
- ``rdp``: Rényi DP of the subsampled Gaussian, Mironov, Talwar and Zhang, "Rényi Differential
  Privacy of the Sampled Gaussian Mechanism", 2019 (Opacus's ``RDPAccountant``).
- ``pld``: privacy loss distributions, Koskela et al. 2020 / Doroshenko et al. 2022, through
  Google's ``dp_accounting`` (an independent implementation, used to cross-check).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from fedsafe.privacy.events import PoissonGaussianEvent

AccountantName = Literal["prv", "rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp", "pld")


def check_accountant(name: str) -> AccountantName:
    """Return ``name`` if it is a known accountant, else raise ``ValueError`` naming the choices."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    return name  # type: ignore[return-value]


def _merge(events: Sequence[PoissonGaussianEvent]) -> list[PoissonGaussianEvent]:
    """Merge consecutive events with equal mechanism (composition is order-free)."""
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        key = (e.sample_rate, e.noise_multiplier)
        merged[key] = merged.get(key, 0) + e.steps
    return [PoissonGaussianEvent(q, s, n) for (q, s), n in merged.items()]


def epsilon(events: Sequence[PoissonGaussianEvent], delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of ``events`` at ``delta``.

    Parameters
    ----------
    events
        Every release so far, in any order.
    delta
        Target delta, in (0, 1).
    accountant
        ``"prv"`` (default), ``"rdp"`` or ``"pld"``.

    Returns
    -------
    float
        Epsilon; 0.0 for no events.
    """
    name = check_accountant(accountant)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    merged = _merge(events)
    if not merged:
        return 0.0
    if name == "pld":
        return _pld_epsilon(merged, delta)
    if name == "prv":
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in merged]
        return float(acc.get_epsilon(delta=delta))
    from opacus.accountants import RDPAccountant

    racc = RDPAccountant()
    racc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in merged]
    return float(racc.get_epsilon(delta=delta))


def _pld_epsilon(events: Sequence[PoissonGaussianEvent], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    composed = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
            for e in events
        ]
    )
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(composed)
    return float(acc.get_epsilon(delta))
