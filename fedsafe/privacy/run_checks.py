"""Settings the accountant cannot evaluate, refused before any process starts.

A delta at or above ``1/n`` gives no guarantee (one record may be released outright with
probability delta; Dwork and Roth 2014, section 2.3) and makes the PRV accountant return
negative epsilons; a delta below ``1e-12`` is outside what the accountants evaluate reliably;
and a target epsilon no noise multiplier reaches makes every site fail inside its first round.
:func:`unevaluable_setting` finds each case from public values only (the run config and each
site's public size), so ``fedsafe simulate`` can refuse before it submits the run (the checks
of :func:`setting_out_of_range`; the accountant's, which import Opacus, beside the run's
start-up) and the ServerApp before round 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent

#: Smallest delta fedsafe lets an accountant evaluate.
MIN_DELTA = 1e-12
#: Smallest target epsilon fedsafe accepts: below it, the noise swamps any training.
MIN_EPSILON = 0.01
#: The largest noise multiplier calibration tries (its ``max_noise``).
MAX_NOISE = 1e4


@dataclass(frozen=True, slots=True)
class PlannedRun:
    """The accounting inputs of a planned run at one site.

    Parameters
    ----------
    target_epsilon
        The run's target (used when ``noise_multiplier`` is 0: calibrated noise).
    delta
        The delta the site reports at.
    noise_multiplier
        Fixed noise, or 0 to calibrate from ``target_epsilon``.
    public_size
        The site's public training-set size (>= 1).
    batch_size
        Expected batch size (>= 1); the Poisson rate is ``1 / ceil(public_size / batch_size)``.
    steps
        Planned noisy steps in the run (rounds x local steps, >= 1).
    accountant
        ``prv`` or ``rdp``.
    """

    target_epsilon: float
    delta: float
    noise_multiplier: float
    public_size: int
    batch_size: int
    steps: int
    accountant: str

    def __post_init__(self) -> None:
        if self.public_size < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("public size, batch size and steps must be >= 1")

    @property
    def sample_rate(self) -> float:
        """Poisson rate per record."""
        return 1.0 / math.ceil(self.public_size / self.batch_size)


def unevaluable_setting(run: PlannedRun) -> tuple[str, str] | None:
    """``(flag or key, reason with the fix)`` if the accountant cannot evaluate ``run``.

    Returns None when the run's epsilon can be computed (and, with calibrated noise, reached).
    The checks of :func:`setting_out_of_range` come first.
    """
    out_of_range = setting_out_of_range(run)
    if out_of_range is not None:
        return out_of_range
    if run.noise_multiplier == 0:
        # One evaluation at the calibration's largest noise: if that misses the target, no
        # calibrated noise reaches it (epsilon falls as the noise grows).
        try:
            least = epsilon(
                [PoissonGaussianEvent(run.sample_rate, MAX_NOISE, run.steps)],
                run.delta,
                run.accountant,
            )
        except (ValueError, ArithmeticError, MemoryError) as exc:
            return "epsilon", f"the accountant cannot evaluate this run ({exc})"
        if not least <= run.target_epsilon:
            return "epsilon", (
                f"{run.target_epsilon:g} cannot be reached with any noise multiplier up to "
                f"{MAX_NOISE:g}; raise the target epsilon or plan fewer rounds or steps"
            )
        return None
    try:
        eps = epsilon(
            [PoissonGaussianEvent(run.sample_rate, run.noise_multiplier, run.steps)],
            run.delta,
            run.accountant,
        )
    except (ValueError, ArithmeticError, MemoryError) as exc:
        return "noise-multiplier", f"the accountant cannot evaluate this run ({exc})"
    if not (math.isfinite(eps) and eps >= 0):
        return "noise-multiplier", (
            f"the accountant returns epsilon {eps} for this run; use more noise or fewer steps"
        )
    return None


def setting_out_of_range(run: PlannedRun) -> tuple[str, str] | None:
    """The checks of :func:`unevaluable_setting` that need no accountant (same results).

    A delta below :data:`MIN_DELTA` or at least ``1/n``, or a calibrated run's target epsilon
    below :data:`MIN_EPSILON`; None otherwise. It imports nothing (``fedsafe simulate`` runs
    it before any process starts, and the accountant's check beside the run's start-up).
    """
    n = run.public_size
    if not run.delta >= MIN_DELTA:
        return "delta", (
            f"{run.delta:g} is below {MIN_DELTA:g}, which the accountant cannot evaluate "
            "reliably; use e.g. 1e-5"
        )
    if run.delta >= 1.0 / n:
        fix = 10.0 ** math.floor(math.log10(1.0 / (10.0 * n)))
        return "delta", (
            f"{run.delta:g} is at least 1/n for a site of about {n} records, which gives no "
            f"guarantee; use at most {fix:g} (1/(10 n))"
        )
    if run.noise_multiplier == 0:
        if not run.target_epsilon >= MIN_EPSILON:
            return "epsilon", (
                f"{run.target_epsilon:g} is below {MIN_EPSILON:g}: no useful noise multiplier "
                "reaches it; raise the target epsilon"
            )
    return None


def unevaluable_anywhere(
    target_epsilon: float, delta: float, noise_multiplier: float
) -> tuple[str, str] | None:
    """The checks that need no site's size (``fedsafe run``, before anything is submitted)."""
    if not delta >= MIN_DELTA:
        return "delta", f"{delta:g} is below {MIN_DELTA:g}, which the accountant cannot evaluate"
    if noise_multiplier == 0 and not target_epsilon >= MIN_EPSILON:
        return "epsilon", (
            f"{target_epsilon:g} is below {MIN_EPSILON:g}: no useful noise multiplier reaches "
            "it; raise the target epsilon"
        )
    return None
