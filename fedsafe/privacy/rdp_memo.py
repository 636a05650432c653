"""Opacus's RDP and PRV epsilons, with each mechanism's Rényi divergences computed once.

Both of Opacus's accountants spend most of their time in one pure function: the Rényi
divergence of one step of the Poisson-subsampled Gaussian at each of its 151 default orders
(Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
2019; ``opacus.accountants.analysis.rdp.compute_rdp``, pure Python per order). The PRV
accountant (Gopi, Lee and Wutschitz, NeurIPS 2021) calls it twice per mechanism and per call to
bound its discretization domain (Remark 5.6 of the paper: the composed RDP bound at
``delta_error / 4`` and one step's at ``delta_error / (8 * steps)``), then discretizes and
composes. A site's ledger commit composes the same mechanisms again and again (one per site of
a shared source, one per run), and a noise calibration measures the same noise twice (the RDP
bracket's end is the exact search's start).

Here the one-step divergences of a ``(sample rate, noise)`` pair are computed once per process
by Opacus's own function and kept; a composition's divergences are then ``steps`` times them,
summed in the history's order, exactly as Opacus forms them. :func:`prv_epsilon` is Opacus's
:class:`~opacus.accountants.PRVAccountant` with only its domain bound fed from the kept values
(the same arithmetic on the same numbers), and :func:`rdp_epsilon` is Opacus's RDP accountant
likewise: both return bit-identical values to Opacus's (tests compare them with ``==``).

Memory (issue 17). A PRV evaluation at a small noise multiplier (a calibration's first probes)
spans millions of grid points: 8.2 million for ``sigma`` 0.024 at ``q`` 0.00087, where scipy's
FFT of the composition (Bluestein's algorithm for a length with a large prime factor) takes
about 1.3 GB of temporaries and keeps a plan of about 500 MB in its cache of recent lengths.
After an evaluation over more than :data:`LARGE_DOMAIN` points, :func:`prv_epsilon` evicts
those plans (:func:`drop_fft_plans`) and hands the freed heap back to the operating system
(:func:`fedsafe.freed_memory.return_freed_memory`), so the peak does not stay resident in a
site's worker or the coordinator. The values are unchanged: a plan is rebuilt identically
when a length is met again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedsafe.freed_memory import return_freed_memory

#: ``(noise multiplier, sample rate, steps)``, Opacus's history entry.
HistoryEntry = tuple[float, float, int]

_MEMO_SIZE = 4096

#: Grid points above which a PRV evaluation's FFT plans and freed buffers are released (a
#: million points: 8 MB per array, a plan of about 64 MB; below it they are kept for reuse).
LARGE_DOMAIN = 1 << 20

#: Distinct small lengths transformed by :func:`drop_fft_plans`: more than the plans scipy's
#: pocketfft keeps per transform type (16 in scipy 1.17), so every cached plan is evicted.
_EVICTING_LENGTHS = range(64, 64 + 32)


def _alphas() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=_MEMO_SIZE)
def one_step_rdp(sample_rate: float, noise_multiplier: float) -> NDArray[np.float64]:
    """Rényi divergences of one step at Opacus's default orders (read-only; kept per process).

    Parameters
    ----------
    sample_rate
        Poisson sampling rate ``q`` in [0, 1].
    noise_multiplier
        Noise standard deviation over the clipping norm (``sigma`` > 0).

    Returns
    -------
    numpy.ndarray
        Shape ``(151,)``: ``opacus.accountants.analysis.rdp.compute_rdp`` with ``steps=1`` at
        ``RDPAccountant.DEFAULT_ALPHAS``; may hold ``inf``.
    """
    from opacus.accountants.analysis import rdp as analysis

    values = np.asarray(
        analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_alphas()
        )
    )
    values.setflags(write=False)
    return values


def composed_rdp(history: Sequence[HistoryEntry]) -> NDArray[np.float64] | int:
    """Divergences of a composition: ``steps`` times each mechanism's, summed in order.

    The same operations as Opacus's ``RDPAccountant.get_privacy_spent`` (Python's ``sum`` of
    ``compute_rdp(...) * steps`` per entry), so the same floating-point value.
    """
    return sum(one_step_rdp(q, sigma) * steps for sigma, q, steps in history)


def rdp_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    """Opacus's RDP epsilon of ``history`` at ``delta`` (identical value, kept divergences)."""
    from opacus.accountants.analysis import rdp as analysis

    if not history:
        return 0.0
    eps, _ = analysis.get_privacy_spent(orders=_alphas(), rdp=composed_rdp(history), delta=delta)
    return float(eps)


def _safe_domain_size(
    history: Sequence[HistoryEntry], eps_error: float, delta_error: float
) -> float:
    """The PRV accountant's truncation bound ``L`` (Opacus's ``compute_safe_domain_size``)."""
    total = sum(steps for _, _, steps in history)
    bound = rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        bound = max(bound, rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
    return max(bound, eps_error) + 3


def _prv_accountant_class() -> type:
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    class KeptDivergencesPRVAccountant(PRVAccountant):  # type: ignore[misc]
        """Opacus's PRV accountant whose domain bound reads the kept one-step divergences."""

        def _get_domain(
            self,
            prvs: list[object],
            num_self_compositions: list[int],
            eps_error: float,
            delta_error: float,
        ) -> Domain:
            del prvs  # the same mechanisms as self.history, in the same order
            bound = _safe_domain_size(self.history, eps_error, delta_error)
            total = sum(num_self_compositions)
            mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            domain = Domain.create_aligned(-bound, bound, mesh)
            self.domain_size = domain.size
            return domain

    return KeptDivergencesPRVAccountant


@functools.cache
def _prv_class() -> type:
    return _prv_accountant_class()


def prv_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    """Opacus's PRV epsilon (upper end of its error interval) of ``history`` at ``delta``.

    Parameters
    ----------
    history
        ``(noise multiplier, sample rate, steps)`` per distinct mechanism, as Opacus's
        ``PRVAccountant.history``.
    delta
        Target delta in (0, 1).

    Returns
    -------
    float
        The value ``PRVAccountant().get_epsilon(delta)`` returns for the same history (Opacus's
        default ``eps_error`` 0.01 and ``delta_error`` ``delta / 1000``); 0 when empty.
    """
    if not history:
        return 0.0
    accountant = _prv_class()()
    accountant.history = list(history)
    try:
        return float(accountant.get_epsilon(delta=delta))
    finally:
        if getattr(accountant, "domain_size", 0) > LARGE_DOMAIN:
            drop_fft_plans()
            return_freed_memory()


def drop_fft_plans() -> None:
    """Evict every real-FFT plan scipy keeps (pocketfft's cache of recent lengths).

    A plan for a long transform with a large prime factor holds hundreds of MB (Bluestein's
    chirp and its transform); scipy offers no call to free it, so this transforms
    :data:`_EVICTING_LENGTHS` tiny arrays, whose plans (a few KB) take every cache slot.
    """
    from scipy import fft

    for length in _EVICTING_LENGTHS:
        fft.irfft(fft.rfft(np.zeros(length)), length)


def clear() -> None:
    """Forget the kept divergences (benchmarks measure a cold process with this)."""
    one_step_rdp.cache_clear()
