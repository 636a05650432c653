"""Before round 1 the coordinator refuses a run every site would refuse, or one not evaluable."""

from __future__ import annotations

import json

import pytest

from fedsafe.client.policy import SitePolicy
from fedsafe.config import RunConfig
from fedsafe.server.site_policies import DeclaredSite, RunRefused, check_declared_sites


def _deployed(name: str, **change) -> DeclaredSite:
    policy = SitePolicy.for_records(300, **change)
    return DeclaredSite.parse(name, json.dumps({"mode": "deployed", **policy.to_mapping()}))


def test_declarations_parse_and_bad_ones_are_refused() -> None:
    site = _deployed("a")
    assert site.policy is not None and site.public_size == 300
    simulated = DeclaredSite.parse("s", json.dumps({"mode": "simulated", "public-size": 87}))
    assert simulated.policy is None and simulated.public_size == 87
    with pytest.raises(RunRefused, match="site x declared an unreadable policy"):
        DeclaredSite.parse("x", "")
    with pytest.raises(RunRefused, match="unreadable"):
        DeclaredSite.parse("x", json.dumps({"mode": "deployed", "delta": 0.9}))


def test_a_run_every_site_refuses_stops_with_each_reason() -> None:
    sites = {"a": _deployed("a"), "b": _deployed("b", max_local_steps=5)}
    with pytest.raises(RunRefused, match="every site refuses.*a refuses dp.*b refuses dp"):
        check_declared_sites(RunConfig.from_mapping({"dp": False}), sites)
    # Only b refuses 10 local steps: the run goes on without it.
    refusals = check_declared_sites(RunConfig.from_mapping({"local-steps": 10}), sites)
    assert list(refusals) == ["b"] and refusals["b"].setting == "local-steps"


def test_a_setting_the_accountant_cannot_evaluate_stops_the_run() -> None:
    sites = {"s": DeclaredSite("s", 87, None)}
    with pytest.raises(RunRefused, match="site s: delta"):
        check_declared_sites(RunConfig.from_mapping({"target-delta": 0.05}), sites)
    assert check_declared_sites(RunConfig.from_mapping({}), sites) == {}
