"""The contract between the mods and the step: values checked on creation, bound per call."""

from __future__ import annotations

import dataclasses

import pytest

from fedsafe.client.mods.contract import (
    ModOrderError,
    RoundBooks,
    RoundGrant,
    SiteCall,
    collecting_event,
    current_grant,
    report_event,
    round_granted,
)
from fedsafe.client.site import resolve_site
from fedsafe.config import RunConfig
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.training.dp_training import TrainPlan
from tests.client.mods.conftest import Site, new_context

PLAN = TrainPlan(local_steps=3, batch_size=8, lr=0.1, noise_multiplier=1.0, sample_rate=0.1)


def _call(site: Site) -> SiteCall:
    context = new_context(site)
    cfg = RunConfig.from_mapping(context.run_config)
    return SiteCall(cfg, resolve_site(context, cfg))


def test_a_grant_cannot_hide_a_round_without_dp_or_with_a_known_key(site: Site) -> None:
    call = _call(site)
    with pytest.raises(ValueError, match="not private"):
        RoundGrant(call, 1, dataclasses.replace(PLAN, dp=False), None, not_private=False)
    with pytest.raises(ValueError, match="deployed site"):
        RoundGrant(call, 1, PLAN, bytes(32), not_private=True)
    with pytest.raises(ValueError, match="32 bytes"):
        RoundGrant(call, 1, PLAN, bytes(8), not_private=True)


def test_a_grant_allows_only_events_no_weaker_than_itself(site: Site) -> None:
    grant = RoundGrant(_call(site), 1, PLAN, None, not_private=False)
    assert grant.allows(PoissonGaussianEvent(0.1, 1.0, 3))
    assert grant.allows(PoissonGaussianEvent(0.05, 2.0, 2))
    assert not grant.allows(PoissonGaussianEvent(0.1, 0.9, 3))
    assert not grant.allows(PoissonGaussianEvent(0.2, 1.0, 3))
    assert not grant.allows(PoissonGaussianEvent(0.1, 1.0, 4))


def test_the_grant_and_the_event_slot_live_for_one_call(site: Site) -> None:
    grant = RoundGrant(_call(site), 1, PLAN, None, not_private=False)
    with round_granted(RoundBooks(grant, None)):
        assert current_grant() is grant
        with collecting_event() as slot:
            report_event(PoissonGaussianEvent(0.1, 1.0, 3))
            with pytest.raises(ModOrderError, match="twice"):
                report_event(PoissonGaussianEvent(0.1, 1.0, 3))
        assert slot.event == PoissonGaussianEvent(0.1, 1.0, 3)
    with pytest.raises(ModOrderError):
        current_grant()
    with pytest.raises(ModOrderError):
        report_event(None)
