"""What a run achieved, site by site: who trained, who was missing at the end, and why.

Read from the run folder's ``rounds.jsonl`` records and ``events.jsonl`` events, so the
ServerApp (into ``summary.json``), ``fedsafe simulate`` and ``fedsafe run`` (their exit code and
table) agree. Two outcomes are failures the operator must see (issue 13):

* no site trained in any round (read-only ledger disks, every site refusing or out of budget):
  the run's model is the initial one, and the command exits non-zero with each site's reason;
* the final round had fewer sites than the run knew (a worker killed for memory once left a
  50-site run with 2 sites): the table names each missing site and why.

A reason is the site's own word as the coordinator recorded it (an error code and its fixed
sentence, a refused setting, "budget exhausted at epsilon ..."), or what the coordinator saw
(down, no reply before the deadline).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsafe.strict_json import read_jsonl as _jsonl

#: Events that name why a site did not train in a round, and how each is worded.
_EVENT_REASONS = {
    "train-error": "error",
    "evaluate-error": "error",
    "query-error": "could not load its data",
    "query-dropped": "query reply dropped",
    "policy-refused": "its policy refuses",
    "budget-exhausted": "privacy budget exhausted",
    "reply-dropped": "reply dropped",
    "site-down": "down (not connected)",
    "deadline-missed": "no reply before the deadline",
}


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """The sites a run knew, those that trained, and the reason of each that did not finish.

    Attributes
    ----------
    known
        Every site named in a round record or an event, in order of first mention.
    trained
        Sites that trained (an accepted model) in at least one round.
    final_round
        Sites that trained in the final round (empty without rounds).
    reasons
        Per site, the last recorded reason it did not train (``(site, reason)`` pairs).
    """

    known: tuple[str, ...]
    trained: tuple[str, ...]
    final_round: tuple[str, ...]
    reasons: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        known = set(self.known)
        if not (set(self.trained) <= known and set(self.final_round) <= set(self.trained)):
            raise ValueError("trained sites must be known, final-round sites must have trained")

    @property
    def no_site_trained(self) -> bool:
        """Whether no site trained in any round (the model is the initial one)."""
        return not self.trained

    def reason(self, site: str) -> str:
        """The last recorded reason ``site`` did not train, or a generic one."""
        return dict(self.reasons).get(site, "no train reply recorded")

    def missing_at_end(self) -> dict[str, str]:
        """Sites the run knew that did not train in its final round, with their reasons."""
        return {s: self.reason(s) for s in self.known if s not in self.final_round}

    def lost_at_end(self) -> dict[str, str]:
        """Sites missing from the final round for a reason other than a spent budget.

        A site whose budget is spent stops cleanly; any other absence (down, error, refusal,
        dropped reply, missed deadline) means the final model lacks a site the run started with.
        """
        return {
            s: r for s, r in self.missing_at_end().items() if not r.startswith("privacy budget")
        }

    def to_dict(self) -> dict[str, Any]:
        """For ``summary.json``: plain lists and a site -> reason mapping."""
        return {
            "sites-known": list(self.known),
            "sites-trained": list(self.trained),
            "sites-in-final-round": list(self.final_round),
            "no-site-trained": self.no_site_trained,
            "missing-at-end": self.missing_at_end(),
        }

    def failure(self) -> str | None:
        """One line for the operator when no site trained, else None."""
        if not self.no_site_trained:
            return None
        why = "; ".join(f"{s} ({self.reason(s)})" for s in self.known) or "no site answered"
        return f"no site trained in any round, the model is the initial one: {why}"


def _event_reason(event: Mapping[str, Any]) -> str:
    kind = str(event.get("kind", ""))
    words = _EVENT_REASONS[kind]
    if kind == "budget-exhausted":
        eps = (event.get("metrics") or {}).get("epsilon")
        return f"{words} at epsilon {eps:.4g}" if isinstance(eps, int | float) else words
    detail = event.get("setting") or event.get("reason")
    code = event.get("code")
    prefix = f"{words} {code}" if code is not None else words
    return f"{prefix}: {' '.join(str(detail).split())[:200]}" if detail else prefix


def _record_reason(site: Mapping[str, Any]) -> str | None:
    status = str(site.get("status", ""))
    if status in ("trained", ""):
        return None
    if status == "refused":
        return f"its policy refuses {site.get('refused-setting', '')}".strip()
    if status == "dropped":
        return f"reply dropped: {site.get('reason', '')}".rstrip(": ")
    if status == "budget-exhausted":
        if isinstance(site.get("epsilon"), int | float):
            return f"privacy budget exhausted at epsilon {site['epsilon']:.4g}"
        return None  # a site that stopped earlier (spent or refused): its earlier reason stands
    return status.replace("-", " ")


def run_outcome(
    rounds: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]]
) -> RunOutcome:
    """The outcome of a run from its round records and events (both in file order)."""
    known: dict[str, None] = {}
    trained: dict[str, None] = {}
    reasons: dict[str, str] = {}
    final: tuple[str, ...] = ()
    for event in events:
        kind = str(event.get("kind", ""))
        if kind not in _EVENT_REASONS:
            continue
        names = event.get("sites") if kind == "deadline-missed" else [event.get("site")]
        for name in names or []:
            if name:
                known.setdefault(str(name))
                reasons[str(name)] = _event_reason(event)
    for record in rounds:
        sites = record.get("sites") or {}
        final = tuple(str(n) for n, s in sites.items() if s.get("status") == "trained")
        for name, site in sites.items():
            known.setdefault(str(name))
            if site.get("status") == "trained":
                trained.setdefault(str(name))
            elif (why := _record_reason(site)) is not None:
                reasons[str(name)] = why
            elif site.get("status") == "budget-exhausted":
                reasons.setdefault(str(name), "privacy budget exhausted")
    # Events precede the record of the round they happened in: a site's later training wins.
    return RunOutcome(
        tuple(known),
        tuple(trained),
        final,
        tuple((s, r) for s, r in reasons.items() if s not in final),
    )


def read_outcome(run_dir: str | Path) -> RunOutcome:
    """:func:`run_outcome` of a run folder (``rounds.jsonl``, ``events.jsonl``)."""
    folder = Path(run_dir)
    return run_outcome(_jsonl(folder / "rounds.jsonl"), _jsonl(folder / "events.jsonl"))
