"""The ledger_commit mod: the event is on disk before the reply leaves; no event, no model."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import Context, Message

from fedsafe.client import privacy_state
from fedsafe.client.mods.contract import current_grant, report_event
from fedsafe.client.mods.ledger_commit import UnaccountedRoundError, ledger_commit
from fedsafe.client.mods.privacy_budget import privacy_budget
from fedsafe.client.mods.site_policy import site_policy
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from tests.client.mods.conftest import Site, app_with, new_context, train_message, trained


def _granted_event() -> PoissonGaussianEvent:
    plan = current_grant().plan
    assert plan.sample_rate is not None
    return PoissonGaussianEvent(plan.sample_rate, plan.noise_multiplier, plan.local_steps)


def _app(handler):
    return app_with([site_policy, privacy_budget, ledger_commit], handler)


def _entries(site: Site):
    if not site.ledger.exists():
        return []
    with SitePrivacyLedger.open(site.ledger) as ledger:
        return ledger.entries()


def test_the_reported_event_is_committed_and_its_spending_added(site: Site) -> None:
    reported: list[PoissonGaussianEvent] = []

    def step(msg: Message, context: Context) -> Message:
        reported.append(_granted_event())
        report_event(reported[0])
        # The ledger entry is written after the step returns, before the reply leaves.
        assert _entries(site) == []
        return trained(msg, context)

    context = new_context(site)
    reply = _app(step)(train_message(site.width()), context)
    (entry,) = _entries(site)
    assert entry.event == reported[0] and entry.round == 1 and entry.run_id == "11"
    metrics = reply.content.metric_records["metrics"]
    assert metrics["epsilon"] == pytest.approx(entry.epsilon_after)
    assert metrics["noise-multiplier"] == reported[0].noise_multiplier
    assert privacy_state.run_events(context) == reported


def test_a_model_without_a_reported_event_never_leaves(site: Site) -> None:
    with pytest.raises(UnaccountedRoundError, match="no privacy event"):
        _app(trained)(train_message(site.width()), new_context(site))
    assert _entries(site) == []


def test_an_event_weaker_than_the_grant_is_refused(site: Site) -> None:
    def less_noise(msg: Message, context: Context) -> Message:
        granted = _granted_event()
        report_event(dataclasses.replace(granted, noise_multiplier=granted.noise_multiplier / 2))
        return trained(msg, context)

    with pytest.raises(UnaccountedRoundError, match="more than the round's grant"):
        _app(less_noise)(train_message(site.width()), new_context(site))
    assert _entries(site) == []
