"""The typed contract between fedsafe's site mods and the training step they wrap.

A mod sees Messages only: it cannot tell whether a train handler clipped and noised its
gradients. So the mods carry the bookkeeping (refusals, noise choice, budget, ledger, release
check, compression) and the guarantee rests on fedsafe's training step
(:func:`fedsafe.client.train_step.training_step`, DP-SGD after Abadi et al., CCS 2016). What
passes between them is explicit and typed, never a record in the message (which the
coordinator writes) and never anything persisted:

* :class:`SiteCall`: the run config and site one message is answered under, resolved once by
  the ``site_policy`` mod after the site's own policy accepted the run;
* :class:`RoundGrant`: the plan the step receives from the ``privacy_budget`` mod, i.e. the
  :class:`~fedsafe.training.dp_training.TrainPlan` whose noise the site chose and whose spending
  its budget allows;
* the :class:`~fedsafe.privacy.events.PoissonGaussianEvent` the step returns with
  :func:`report_event`, which the ``ledger_commit`` mod commits before the reply leaves.

They travel in :mod:`contextvars` set by a mod for exactly the duration of its ``call_next``:
in-process, per call, gone when the mod returns. A step run without the mods finds no grant
and refuses (:class:`ModOrderError`) before touching the data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedsafe.client.site import SiteSetup
from fedsafe.config import RunConfig
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.training.dp_training import TrainPlan

if TYPE_CHECKING:
    from fedsafe.client.privacy_state import SiteAccount

_USE_SITE_MODS = (
    "build the ClientApp with mods=fedsafe.client.mods.site_mods() (in that order) and train "
    "with fedsafe.client.training_step"
)


class ModOrderError(RuntimeError):
    """A site mod or the training step ran without the mod that must wrap it.

    Reported to the coordinator as code 4199 only (:mod:`fedsafe.client.site_errors`).
    """


@dataclass(frozen=True, slots=True)
class SiteCall:
    """The run config and site a train or evaluate message is answered under.

    Parameters
    ----------
    cfg
        The run config, as the coordinator sent it and the site read it.
    site
        The site's data and its own policy (None policy: a simulated site).
    """

    cfg: RunConfig
    site: SiteSetup


@dataclass(frozen=True, slots=True)
class RoundGrant:
    """What the ``privacy_budget`` mod allows the training step to do in one round.

    Parameters
    ----------
    call
        The run config and site.
    server_round
        The coordinator's round number (for the ledger entry), >= 0.
    plan
        Steps, batch size, learning rate, and the noise multiplier and Poisson rate (of the
        site's public size) the site chose; ``plan.dp`` is False only at a simulated site whose
        run asked for no DP.
    key
        None (normal use: the step keys sampling and noise from ``os.urandom``), or 32 bytes
        at a simulated site that asked for reproducible noise.
    not_private
        Whether the reply must be marked "not private": always when ``plan.dp`` is False or a
        key is given.

    Raises
    ------
    ValueError
        If the grant would let an update leave unmarked without DP, or the key is not 32 bytes.
    """

    call: SiteCall
    server_round: int
    plan: TrainPlan
    key: bytes | None
    not_private: bool

    def __post_init__(self) -> None:
        if self.server_round < 0:
            raise ValueError(f"server-round must be >= 0, got {self.server_round}")
        if self.key is not None and len(self.key) != 32:
            raise ValueError(f"a reproducible key has 32 bytes, got {len(self.key)}")
        if (not self.plan.dp or self.key is not None) and not self.not_private:
            raise ValueError("a round without DP, or with a known key, must be marked not private")
        if self.call.site.policy is not None and (not self.plan.dp or self.key is not None):
            raise ValueError("a deployed site always trains with DP and a secret key")

    def allows(self, event: PoissonGaussianEvent) -> bool:
        """Whether ``event`` spends no more than this grant: as much noise, no more sampling."""
        return (
            self.plan.dp
            and event.noise_multiplier >= self.plan.noise_multiplier
            and self.plan.sample_rate is not None
            and event.sample_rate <= self.plan.sample_rate
            and event.steps <= self.plan.local_steps
        )


@dataclass(frozen=True, slots=True)
class RoundBooks:
    """The grant and the account it was checked against (the mods' own bookkeeping)."""

    grant: RoundGrant
    account: SiteAccount | None


class EventSlot:
    """Where the step returns its event to ``ledger_commit``: filled at most once."""

    __slots__ = ("_event", "_filled")

    def __init__(self) -> None:
        self._event: PoissonGaussianEvent | None = None
        self._filled = False

    @property
    def event(self) -> PoissonGaussianEvent | None:
        """The reported event, or None if the step reported none (or no DP)."""
        return self._event

    def fill(self, event: PoissonGaussianEvent | None) -> None:
        """Record the step's event; a second report is refused (one event per round)."""
        if self._filled:
            raise ModOrderError("the training step reported its privacy event twice in a round")
        self._event, self._filled = event, True


_SITE_CALL: ContextVar[SiteCall | None] = ContextVar("fedsafe_site_call", default=None)
_BOOKS: ContextVar[RoundBooks | None] = ContextVar("fedsafe_round_books", default=None)
_SLOT: ContextVar[EventSlot | None] = ContextVar("fedsafe_event_slot", default=None)


@contextlib.contextmanager
def site_call_bound(call: SiteCall) -> Iterator[None]:
    """Make ``call`` the current site call while the block runs."""
    token = _SITE_CALL.set(call)
    try:
        yield
    finally:
        _SITE_CALL.reset(token)


@contextlib.contextmanager
def round_granted(books: RoundBooks) -> Iterator[None]:
    """Make ``books`` (and its grant) current while the block runs."""
    token = _BOOKS.set(books)
    try:
        yield
    finally:
        _BOOKS.reset(token)


@contextlib.contextmanager
def collecting_event() -> Iterator[EventSlot]:
    """Open an event slot for the step while the block runs, and yield it."""
    slot = EventSlot()
    token = _SLOT.set(slot)
    try:
        yield slot
    finally:
        _SLOT.reset(token)


def current_site_call() -> SiteCall:
    """The site call of the message being answered.

    Raises
    ------
    ModOrderError
        Outside the ``site_policy`` mod.
    """
    call = _SITE_CALL.get()
    if call is None:
        raise ModOrderError(f"no site call: the site_policy mod did not run; {_USE_SITE_MODS}")
    return call


def current_books() -> RoundBooks:
    """The grant of the round being trained and its account.

    Raises
    ------
    ModOrderError
        Outside the ``privacy_budget`` mod.
    """
    books = _BOOKS.get()
    if books is None:
        raise ModOrderError(f"no round grant: the privacy_budget mod did not run; {_USE_SITE_MODS}")
    return books


def current_grant() -> RoundGrant:
    """The plan the training step may run this round (see :func:`current_books`)."""
    return current_books().grant


def require_event_slot() -> None:
    """Refuse, before any training, unless ``ledger_commit`` waits for the step's event.

    Raises
    ------
    ModOrderError
        Outside the ``ledger_commit`` mod.
    """
    if _SLOT.get() is None:
        raise ModOrderError(f"no ledger_commit mod around the training step; {_USE_SITE_MODS}")


def report_event(event: PoissonGaussianEvent | None) -> None:
    """Return the round's privacy event (None without DP) to the ``ledger_commit`` mod.

    Raises
    ------
    ModOrderError
        Outside the ``ledger_commit`` mod, or on a second report in the same round.
    """
    slot = _SLOT.get()
    if slot is None:
        raise ModOrderError(f"no ledger_commit mod around the training step; {_USE_SITE_MODS}")
    slot.fill(event)
