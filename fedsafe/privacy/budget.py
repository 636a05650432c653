"""A site's lifetime privacy budget: the per-round check and the noise plan.

Each site sets ``(epsilon_max, delta)`` for its data set. Before a round, the client composes
every event already in its ledger with the event it is about to spend and trains only if the
total stays within ``epsilon_max`` (composition by an accountant, never a sum of epsilons:
Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; Gopi et al., NeurIPS 2021).

Planning chooses one noise multiplier for a whole run so the remaining budget lasts exactly the
planned rounds, by the conservative bisection of
:func:`~fedsafe.privacy.calibration.calibrate_noise_multiplier`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedsafe.errors import BudgetExhaustedError
from fedsafe.privacy.accounting import (
    Composition,
    account_accountant,
    check_accountant,
    epsilon,
)
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import LedgerEntry, SitePrivacyLedger, recorded_epsilon

BUDGET_EXHAUSTED = "budget exhausted"
#: A plan is refused when less than this fraction of the budget remains.
MIN_REMAINING_FRACTION = 0.01


@dataclass(frozen=True, slots=True)
class PrivacyBudget:
    """A site's lifetime ``(epsilon_max, delta)`` for one data set.

    Parameters
    ----------
    epsilon_max
        Largest total epsilon the site allows on the data set, finite and > 0.
    delta
        Delta of the guarantee, in (0, 1); keep it well below 1 / (number of records).
    """

    epsilon_max: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon_max > 0 and math.isfinite(self.epsilon_max)):
            raise ValueError(
                f"epsilon_max must be finite and > 0, got {self.epsilon_max}; set the site's "
                "privacy budget (e.g. epsilon-max = 3.0)"
            )
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}; e.g. delta = 1e-5")


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """Whether a site may spend one more event on a data set.

    Parameters
    ----------
    allowed
        ``True`` if ``epsilon_after <= epsilon_max``.
    epsilon_now
        Epsilon already spent (all ledger events composed).
    epsilon_after
        Epsilon after the proposed event.
    epsilon_max
        The site's budget.
    reason
        One line for logs and the reply: ``"within budget ..."`` or ``"budget exhausted ..."``.
    """

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    epsilon_max: float
    reason: str


@dataclass(frozen=True, slots=True)
class PrivacyPlan:
    """The noise multiplier that makes the remaining budget last ``rounds`` rounds.

    Parameters
    ----------
    noise_multiplier
        Calibrated noise multiplier for every round of the run.
    sample_rate, steps_per_round, rounds
        The plan it was calibrated for.
    delta, epsilon_max, accountant
        The budget and the accountant.
    epsilon_spent
        Epsilon already spent before the run.
    epsilon_after_round
        Expected cumulative epsilon (prior spending included) after rounds 1 .. ``rounds``.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    delta: float
    epsilon_max: float
    accountant: str
    epsilon_spent: float
    epsilon_after_round: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.epsilon_after_round) != self.rounds:
            raise ValueError("epsilon_after_round must have one value per planned round")

    def event(self) -> PoissonGaussianEvent:
        """Return the event of one planned round."""
        return PoissonGaussianEvent(self.sample_rate, self.noise_multiplier, self.steps_per_round)


def check_round(
    ledger: SitePrivacyLedger,
    fingerprint: str,
    budget: PrivacyBudget,
    event: PoissonGaussianEvent,
    accountant: str = "prv",
) -> BudgetDecision:
    """Decide, before training, whether one more round fits the site's lifetime budget.

    Parameters
    ----------
    ledger
        The site's ledger.
    fingerprint
        The data set's fingerprint.
    budget
        The site's budget for that data set.
    event
        The round about to be trained.
    accountant
        Accountant composing the ledger's events and ``event`` at ``budget.delta`` (PLD
        beyond :data:`~fedsafe.privacy.accounting.PRV_MECHANISM_LIMIT` distinct mechanisms,
        as the commit will).

    Returns
    -------
    BudgetDecision
        ``allowed`` is ``False`` when the round would exceed ``budget.epsilon_max``; the
        client then does not train and replies :data:`BUDGET_EXHAUSTED`.
    """
    check_accountant(accountant)
    entries = ledger.entries()
    # One account: the fingerprint names the data version, it does not filter
    # (SitePrivacyLedger.events).
    del fingerprint
    events = [e.event for e in entries]
    # The accountant the commit will use (account_accountant), for both values, and never
    # below what the account recorded at this delta (PRV values before a switch to PLD).
    accountant = account_accountant(Composition.of([*events, event]), accountant, budget.delta)
    recorded = recorded_epsilon(entries, budget.delta)
    eps_now = max(epsilon(events, budget.delta, accountant), recorded)
    eps_after = max(epsilon([*events, event], budget.delta, accountant), recorded)
    allowed = eps_after <= budget.epsilon_max
    state = "within budget" if allowed else BUDGET_EXHAUSTED
    reason = (
        f"{state}: epsilon {eps_now:.4g} spent, {eps_after:.4g} after this round, "
        f"budget {budget.epsilon_max:.4g} at delta {budget.delta:g} ({accountant})"
    )
    return BudgetDecision(allowed, eps_now, eps_after, budget.epsilon_max, reason)


def record_round(
    ledger: SitePrivacyLedger,
    fingerprint: str,
    budget: PrivacyBudget,
    event: PoissonGaussianEvent,
    *,
    run_id: str,
    round: int,
    clip_norm: float,
    accountant: str = "prv",
) -> LedgerEntry:
    """Commit a trained round to the ledger, refusing it if it would exceed the budget.

    Call this after training and before the update leaves the site; send the update only if
    it returns. The budget is re-checked under the ledger's write lock, so two runs on the
    same data cannot both spend the last of the budget.

    Raises
    ------
    BudgetExhaustedError
        If the round no longer fits; nothing is recorded and the update must be discarded.
    """
    return ledger.record(
        run_id,
        round,
        event,
        clip_norm,
        budget.delta,
        fingerprint,
        accountant,
        epsilon_max=budget.epsilon_max,
    )


def plan_noise(
    budget: PrivacyBudget,
    spent_events: Sequence[PoissonGaussianEvent],
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: str = "prv",
) -> PrivacyPlan:
    """Choose the noise multiplier so the remaining budget lasts exactly ``rounds`` rounds.

    Parameters
    ----------
    budget
        The site's lifetime budget.
    spent_events
        Events already in the ledger for this data set.
    sample_rate
        Poisson sampling rate (batch size / number of training records).
    steps_per_round
        Noisy optimizer steps per round.
    rounds
        Planned rounds.
    accountant
        Accountant for calibration and for the expected epsilons: the site's, or PLD when the
        spent events and the planned round hold more than
        :data:`~fedsafe.privacy.accounting.PRV_MECHANISM_LIMIT` distinct mechanisms (as the
        commits will; the plan's ``accountant`` says which).

    Returns
    -------
    PrivacyPlan
        The noise multiplier and the expected cumulative epsilon after each round; the last
        is at most ``budget.epsilon_max`` and within the calibration tolerance of it.

    Raises
    ------
    BudgetExhaustedError
        If the spent events already reach the budget.
    """
    check_accountant(accountant)
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds}")
    if int(steps_per_round) != steps_per_round or steps_per_round < 1:
        raise ValueError(f"steps_per_round must be an integer >= 1, got {steps_per_round}")
    prior = list(spent_events)
    # Many distinct mechanisms already spent: PLD, composed onto the kept prior, as the commits
    # will (account_accountant); the plan names the accountant it used.
    accountant = account_accountant(
        Composition.of([*prior, PoissonGaussianEvent(sample_rate, 1.0, steps_per_round)]),
        accountant,
        budget.delta,
    )
    eps_spent = epsilon(prior, budget.delta, accountant)
    # A sliver of budget would be "spent" on noise so large the rounds teach nothing.
    if eps_spent >= budget.epsilon_max * (1.0 - MIN_REMAINING_FRACTION):
        raise BudgetExhaustedError(
            f"{BUDGET_EXHAUSTED}: epsilon {eps_spent:.4g} already spent leaves under 1% of "
            f"the budget {budget.epsilon_max:.4g} at delta {budget.delta:g}; raise epsilon-max "
            "or use a new data set"
        )
    sigma = calibrate_noise_multiplier(
        budget.epsilon_max,
        budget.delta,
        sample_rate,
        steps_per_round * rounds,
        prior=prior,
        accountant=accountant,
        rel_tolerance=0.002,
    )
    # One event of r * steps equals r events of ``steps`` (same mechanism, composition).
    after = tuple(
        epsilon(
            [*prior, PoissonGaussianEvent(sample_rate, sigma, steps_per_round * r)],
            budget.delta,
            accountant,
        )
        for r in range(1, rounds + 1)
    )
    return PrivacyPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=rounds,
        delta=budget.delta,
        epsilon_max=budget.epsilon_max,
        accountant=accountant,
        epsilon_spent=eps_spent,
        epsilon_after_round=after,
    )
