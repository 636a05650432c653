"""A site's privacy spending: this run's events, its lifetime ledger, and the noise it uses.

With a ledger, a run's events are its ledger entries under fedsafe's run id (the train config's
``fedsafe-run-id``, kept across a resume; :func:`run_key`, :func:`ledger_run`), so a site
restarted mid-run composes the run's earlier releases. Without one, they live in the ClientApp's
context state, which Flower keeps across the rounds of a run. Either way epsilon is cumulative
over the run and never reset per round (Flower's own Opacus example reports one round's epsilon
each round). With a ledger (``ledger-path`` in the node
config, or the run's ``ledger-dir``), every release is committed to the site's hash-chained
ledger before the update leaves, and the reported epsilon composes every run on the same data.

The noise multiplier is fixed once, in the first round of a run: given; or calibrated so the
planned run (rounds x local steps) spends at most the run's target epsilon and, with a lifetime
budget, so the remaining budget lasts the planned rounds (the larger noise of the two).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context

from fedsafe.client.phase_profile import phase
from fedsafe.privacy.accounting import account_epsilon, epsilon
from fedsafe.privacy.budget import PrivacyBudget, check_round, plan_noise, record_round
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import LedgerEntry, SitePrivacyLedger, recorded_epsilon
from fedsafe.protocol import FEDSAFE_RUN_ID

STATE_KEY = "fedsafe-privacy"


#: fedsafe's run id: 32 lower-case hex digits (:func:`fedsafe.server.checkpoint.new_run_id`).
_FEDSAFE_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def run_key(config: ConfigRecord, context: Context) -> str:
    """The id this run's releases are recorded under in the site's ledger.

    fedsafe's own run id from the train config (``fedsafe-run-id``), which a resumed run keeps
    and which a restarted site receives again, so the run's epsilon is recomposed from the
    ledger after either; Flower's run id only for a message without one (a ClientApp driven by
    another ServerApp). A malformed value is not an id: Flower's is used instead.
    """
    given = config.get(FEDSAFE_RUN_ID)
    if isinstance(given, str) and _FEDSAFE_RUN_ID.match(given):
        return given
    return str(context.run_id)


def ledger_run(
    ledger: SitePrivacyLedger, key: str, fingerprint: str
) -> tuple[list[PoissonGaussianEvent], float | None]:
    """The run's events from the site's ledger and the noise its first round fixed (or None).

    The ledger, not the ClientApp's memory, says what a run spent: a site process restarted
    mid-run (new context state, same ledger) composes the run's earlier releases and keeps its
    noise multiplier. Only this site's entries (``fingerprint``) count: simulated sites of one
    shared source record the same run into one account.
    """
    entries = ledger.run_entries(key)
    events = [e.event for e in entries if e.dataset_fingerprint == fingerprint]
    return events, (events[0].noise_multiplier if events else None)


def run_events(context: Context) -> list[PoissonGaussianEvent]:
    """The events this site has spent in this run, from the context state."""
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        return []
    return [PoissonGaussianEvent.from_dict(e) for e in json.loads(str(record["events"]))]


def stored_noise(context: Context) -> float | None:
    """The noise multiplier fixed in the first round, if any."""
    record = context.state.config_records.get(STATE_KEY)
    return None if record is None else float(record["noise-multiplier"])  # type: ignore[arg-type]


def store(context: Context, events: list[PoissonGaussianEvent], noise_multiplier: float) -> None:
    """Write the run's events and noise multiplier back to the context state."""
    context.state.config_records[STATE_KEY] = ConfigRecord(
        {
            "events": json.dumps([e.to_dict() for e in events]),
            "noise-multiplier": float(noise_multiplier),
        }
    )


@dataclass(frozen=True, slots=True)
class NoiseChoice:
    """The inputs of a site's noise decision for one run."""

    given: float
    target_epsilon: float
    delta: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    accountant: str


def choose_noise(
    choice: NoiseChoice,
    budget: PrivacyBudget | None,
    prior: list[PoissonGaussianEvent],
    remembered: float | None = None,
) -> float:
    """The given noise; else the larger of the run target's and the lifetime budget's noise.

    Both bounds then hold: the run spends at most its target epsilon, and the site's lifetime
    spending stays within its budget over the planned rounds. ``remembered``: the run target's
    noise this site already calibrated for exactly ``choice`` (:func:`remembered_run_noise`),
    used instead of calibrating again.

    Raises
    ------
    BudgetExhaustedError
        If a budget is set and ``prior`` already reaches it.
    """
    if choice.given > 0:
        return choice.given
    if remembered is not None and budget is None:
        return remembered  # calibrated before round 1: no calibration phase in the profile
    with phase("calibration"):
        return _calibrated_noise(choice, budget, prior, remembered)


def run_target_noise(choice: NoiseChoice) -> float:
    """The smallest noise whose planned run (rounds x local steps) spends <= the run's target.

    Raises
    ------
    ValueError
        If no noise up to the calibration's maximum reaches the target.
    """
    return calibrate_noise_multiplier(
        choice.target_epsilon,
        choice.delta,
        choice.sample_rate,
        choice.steps_per_round * choice.rounds,
        accountant=choice.accountant,
    )


#: Context-state key of the run noise a simulated site calibrated before round 1.
CALIBRATION_KEY = "fedsafe-run-noise"


def _choice_key(choice: NoiseChoice) -> str:
    return json.dumps(
        [
            choice.given, choice.target_epsilon, choice.delta, choice.sample_rate,
            choice.steps_per_round, choice.rounds, choice.accountant,
        ]
    )  # fmt: skip


def remember_run_noise(context: Context, choice: NoiseChoice, noise_multiplier: float) -> None:
    """Keep ``noise_multiplier`` (:func:`run_target_noise` of ``choice``) in the context state.

    Raises
    ------
    ValueError
        If ``noise_multiplier`` is not finite and > 0.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be finite and > 0, got {noise_multiplier}")
    context.state.config_records[CALIBRATION_KEY] = ConfigRecord(
        {"choice": _choice_key(choice), "noise-multiplier": float(noise_multiplier)}
    )


def remembered_run_noise(context: Context, choice: NoiseChoice) -> float | None:
    """The run noise kept for exactly ``choice`` (every field equal), else None."""
    record = context.state.config_records.get(CALIBRATION_KEY)
    if record is None or record.get("choice") != _choice_key(choice):
        return None
    value = record.get("noise-multiplier")
    if not isinstance(value, float) or not (math.isfinite(value) and value > 0):
        return None
    return value


def _calibrated_noise(
    choice: NoiseChoice,
    budget: PrivacyBudget | None,
    prior: list[PoissonGaussianEvent],
    remembered: float | None,
) -> float:
    for_run = remembered if remembered is not None else run_target_noise(choice)
    if budget is None:
        return for_run
    plan = plan_noise(
        budget, prior, choice.sample_rate, choice.steps_per_round, choice.rounds, choice.accountant
    )
    return max(for_run, plan.noise_multiplier)


@dataclass(frozen=True, slots=True)
class Spending:
    """A site's epsilon after a release: over its lifetime (all runs) and over this run."""

    lifetime: float
    run: float


class SiteAccount:
    """The site's view of its spending for one round: check before, commit after.

    Parameters
    ----------
    ledger
        The site's ledger, or None (then only this run's events are known).
    fingerprint
        The data set's fingerprint.
    budget
        The lifetime budget, or None.
    delta, accountant
        How epsilon is reported.
    run_events
        This run's earlier events (from the context state).
    """

    def __init__(
        self,
        ledger: SitePrivacyLedger | None,
        fingerprint: str,
        budget: PrivacyBudget | None,
        delta: float,
        accountant: str,
        run_events: list[PoissonGaussianEvent],
    ) -> None:
        self.ledger = ledger
        self.fingerprint = fingerprint
        self.budget = budget
        self.delta = budget.delta if budget is not None else delta
        self.accountant = accountant
        self.run_events = run_events

    def lifetime_events(self) -> list[PoissonGaussianEvent]:
        """Every event spent on this data set (ledger), or this run's without a ledger."""
        if self.ledger is None:
            return list(self.run_events)
        return self.ledger.events(self.fingerprint)

    def prior_to_run(self) -> list[PoissonGaussianEvent]:
        """Events spent before this run began (earlier runs on the same data)."""
        events = self.lifetime_events()
        return events[: max(0, len(events) - len(self.run_events))]

    def refusal(self, planned: PoissonGaussianEvent) -> str | None:
        """None if the planned round fits the budget, else the reason it does not."""
        if self.budget is None or self.ledger is None:
            return None
        decision = check_round(self.ledger, self.fingerprint, self.budget, planned, self.accountant)
        return None if decision.allowed else decision.reason

    def spent_now(self) -> float:
        """Epsilon spent so far on this data set, never below what the ledger recorded."""
        eps = account_epsilon(self.lifetime_events(), self.delta, self.accountant)[0]
        if self.ledger is None:
            return eps
        # PRV values recorded before the account moved to PLD may be above its composition.
        return max(eps, recorded_epsilon(self.ledger.entries(), self.delta))

    def spent_in_run(self) -> float:
        """Epsilon spent by this run's earlier rounds alone."""
        return epsilon(self.run_events, self.delta, self.accountant)

    def commit(
        self, event: PoissonGaussianEvent, run_id: str, server_round: int, clip_norm: float
    ) -> Spending:
        """Commit the release (ledger first, durably), then return the epsilon to report."""
        run = [*self.run_events, event]
        if self.ledger is not None:
            with phase("ledger-record"):
                entry = self._record(event, run_id, server_round, clip_norm)
            lifetime = entry.epsilon_after
        else:
            lifetime = epsilon(run, self.delta, self.accountant)
        with phase("run-epsilon"):
            return Spending(lifetime, epsilon(run, self.delta, self.accountant))

    def _record(
        self, event: PoissonGaussianEvent, run_id: str, server_round: int, clip_norm: float
    ) -> LedgerEntry:
        ledger = self.ledger
        if ledger is None:
            raise ValueError("no ledger to record in")
        if self.budget is not None:
            return record_round(
                ledger, self.fingerprint, self.budget, event,
                run_id=run_id, round=server_round, clip_norm=clip_norm,
                accountant=self.accountant,
            )  # fmt: skip
        return ledger.record(
            run_id, server_round, event, clip_norm, self.delta, self.fingerprint, self.accountant
        )
