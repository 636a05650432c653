"""Accountants: epsilon of a sequence of privacy events, recomputed from the events alone.

Epsilon is never added up across rounds or runs; the events are composed by an accountant:

- ``prv``: the Privacy Random Variable accountant of Gopi, Lee and Wutschitz, "Numerical
  Composition of Differential Privacy", NeurIPS 2021 (Opacus's ``PRVAccountant``). It returns
  the upper end of its error interval, so the reported epsilon is conservative.
- ``rdp``: Rényi DP of the subsampled Gaussian, Mironov, Talwar and Zhang, "Rényi Differential
  Privacy of the Sampled Gaussian Mechanism", 2019 (Opacus's ``RDPAccountant``).
- ``pld``: privacy loss distributions, Koskela et al. 2020 / Doroshenko et al. 2022, through
  Google's ``dp_accounting`` (an independent implementation, used to cross-check).

Cost: composition is order-free, so a ledger of many rounds with the same sampling rate and
noise is one mechanism self-composed ``count`` times (``dp_accounting``'s
``SelfComposedDpEvent``). Events are reduced to a :class:`Composition` (one entry per distinct
mechanism, steps summed) and each ``(composition, delta, accountant)`` is composed once per
process: a round's budget check, its ledger commit and the run's epsilon, which ask for the same
composition, share one accountant call. The memo holds exact values only (it is keyed by
everything the value depends on), so a cached epsilon is never below the full composition;
:func:`epsilon_full_composition` is the uncached path, kept for tests and benchmarks.

PLD is composed incrementally: each process keeps the distributions of its latest compositions
and convolves only the new events onto the largest one contained
(:mod:`fedsafe.privacy.incremental_pld`). An account with many distinct mechanisms (several
sites sharing one source, many runs) is composed with PLD rather than PRV
(:func:`account_accountant`), so a commit costs one convolution per new mechanism instead of a
PRV composition of all of them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from fedsafe.privacy.events import PoissonGaussianEvent

AccountantName = Literal["prv", "rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp", "pld")
#: Distinct ``(composition, delta, accountant)`` results kept per process.
MEMO_SIZE = 4096
#: Distinct mechanisms beyond which an account composed with PRV is composed with PLD instead
#: (:func:`account_accountant`).
PRV_MECHANISM_LIMIT = 8
#: Deltas below which an account keeps PRV whatever its number of mechanisms
#: (:func:`account_accountant`).
PLD_MIN_DELTA = 1e-10


def check_accountant(name: str) -> AccountantName:
    """Return ``name`` if it is a known accountant, else raise ``ValueError`` naming the choices."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    return name  # type: ignore[return-value]


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@dataclass(frozen=True, slots=True)
class Composition:
    """A multiset of releases: each distinct mechanism once, with its total number of steps.

    Two event lists with the same composition have the same epsilon under every accountant
    (composition is commutative and associative), so this is the cache key.

    Parameters
    ----------
    mechanisms
        One :class:`~fedsafe.privacy.events.PoissonGaussianEvent` per distinct
        ``(sample_rate, noise_multiplier)``, ``steps`` summed over the events, sorted by
        ``(sample_rate, noise_multiplier)``. Build it with :meth:`of`.

    Raises
    ------
    ValueError
        If two mechanisms are equal or the order is not canonical.
    """

    mechanisms: tuple[PoissonGaussianEvent, ...]

    def __post_init__(self) -> None:
        keys = [(m.sample_rate, m.noise_multiplier) for m in self.mechanisms]
        if keys != sorted(set(keys)):
            raise ValueError("mechanisms must be distinct and sorted; build with Composition.of")

    @classmethod
    def of(cls, events: Iterable[PoissonGaussianEvent]) -> Composition:
        """Merge ``events`` (any order) into their composition, in O(number of events)."""
        steps: dict[tuple[float, float], int] = {}
        for e in events:
            key = (e.sample_rate, e.noise_multiplier)
            steps[key] = steps.get(key, 0) + e.steps
        return cls(tuple(PoissonGaussianEvent(q, s, n) for (q, s), n in sorted(steps.items())))

    @property
    def steps(self) -> int:
        """Total number of noisy steps."""
        return sum(m.steps for m in self.mechanisms)

    def __bool__(self) -> bool:
        return bool(self.mechanisms)


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
        Epsilon; 0.0 for no events. Equal to :func:`epsilon_full_composition` (the same
        accountant on the same mechanisms), computed once per process per composition.
    """
    return epsilon_of(Composition.of(events), delta, accountant, len(events))


def epsilon_of(
    composition: Composition, delta: float, accountant: str = "prv", events: int = 0
) -> float:
    """Epsilon of a :class:`Composition` at ``delta``, memoised per process.

    ``events``: how many events the composition merges; PLD reads its epsilon at a delta
    lowered by that many events' truncation mass (``incremental_pld.pld_epsilon``), so that it
    is not below the events composed one by one. Other accountants ignore it.

    Raises
    ------
    ValueError
        If ``delta`` is not in (0, 1) or the accountant is unknown.
    """
    name = check_accountant(accountant)
    _check_delta(delta)
    if not composition:
        return 0.0
    # The number of events matters to PLD only (its truncation slack): other keys stay shared.
    count = max(int(events), len(composition.mechanisms)) if name == "pld" else 0
    return _memo_epsilon(composition, float(delta), name, count)


@functools.lru_cache(maxsize=MEMO_SIZE)
def _memo_epsilon(
    composition: Composition, delta: float, name: AccountantName, events: int = 0
) -> float:
    if name == "pld":
        from fedsafe.privacy.incremental_pld import pld_epsilon

        # Composed onto the largest kept composition it contains (an account's prefix).
        return pld_epsilon(composition, delta, events)
    return _compose(composition.mechanisms, delta, name)


def account_accountant(
    composition: Composition, accountant: str, delta: float | None = None
) -> AccountantName:
    """The accountant that composes an account holding ``composition``.

    The site's own, except that PRV gives way to dp_accounting's PLD beyond
    :data:`PRV_MECHANISM_LIMIT` distinct mechanisms: PRV recomposes every mechanism at every
    call (about 0.2 s for 10 mechanisms, 1.5 s for 50), while PLD is composed incrementally
    onto the account's kept prefix (:mod:`fedsafe.privacy.incremental_pld`). Both are upper
    bounds on the true epsilon; PLD's is the floor fedsafe never reports below. The caller
    records the accountant returned with the value.

    Parameters
    ----------
    composition
        Every event of the account, including the one about to be spent.
    accountant
        The site's accountant.
    delta
        The delta the account is stated at. Below :data:`PLD_MIN_DELTA` PRV is kept: the
        incremental PLD reads its epsilon at delta lowered by a slack per event
        (:mod:`fedsafe.privacy.incremental_pld`), which at such deltas would cost several
        percent of epsilon or make it infinite for a long ledger.

    Returns
    -------
    str
        ``accountant``, or ``"pld"`` when it is ``"prv"``, ``composition`` has more than
        :data:`PRV_MECHANISM_LIMIT` distinct mechanisms and ``delta`` is not below
        :data:`PLD_MIN_DELTA`.

    Raises
    ------
    ValueError
        If ``accountant`` is unknown.
    """
    name = check_accountant(accountant)
    if name != "prv" or len(composition.mechanisms) <= PRV_MECHANISM_LIMIT:
        return name
    return name if delta is not None and delta < PLD_MIN_DELTA else "pld"


def account_epsilon(
    events: Iterable[PoissonGaussianEvent], delta: float, accountant: str = "prv"
) -> tuple[float, AccountantName]:
    """Epsilon of an account's ``events`` and the accountant that composed it.

    :func:`epsilon` with the accountant :func:`account_accountant` chooses.

    Returns
    -------
    tuple[float, str]
        ``(epsilon, accountant)``.
    """
    spent = list(events)
    composition = Composition.of(spent)
    name = account_accountant(composition, accountant, delta)
    return epsilon_of(composition, delta, name, len(spent)), name


def clear_memo() -> None:
    """Forget every memoised epsilon (benchmarks measure the first call with this)."""
    from fedsafe.privacy import incremental_pld

    _memo_epsilon.cache_clear()
    incremental_pld.clear()


def epsilon_full_composition(
    events: Sequence[PoissonGaussianEvent], delta: float, accountant: str = "prv"
) -> float:
    """The slow path: every event passed to the accountant as its own mechanism, no memo.

    This is the reference the fast path is tested against; it is O(events) accountant work.

    Parameters
    ----------
    events, delta, accountant
        As in :func:`epsilon`.

    Returns
    -------
    float
        Epsilon; 0.0 for no events.
    """
    name = check_accountant(accountant)
    _check_delta(delta)
    if not events:
        return 0.0
    return _compose(tuple(events), float(delta), name)


def _compose(mechanisms: Sequence[PoissonGaussianEvent], delta: float, name: str) -> float:
    if name == "pld":
        return _pld_epsilon(mechanisms, delta)
    from fedsafe.privacy.rdp_memo import prv_epsilon, rdp_epsilon

    # Opacus's accountants, with each mechanism's Rényi divergences computed once per process
    # (fedsafe.privacy.rdp_memo): the same values, bit for bit.
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in mechanisms]
    if name == "prv":
        # Opacus's upper end goes below 0 at a large delta (-0.078 at 0.1 for 100 steps of
        # (0.01, 1.0)): an epsilon is >= 0 (the ledger refuses less; PLD gives 0 there).
        return max(0.0, prv_epsilon(history, delta))
    return rdp_epsilon(history, delta)


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
