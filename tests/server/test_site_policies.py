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


class ClientAppGrid:
    """A Grid whose nodes answer with the real ClientApp, each with its own node config."""

    def __init__(self, node_configs: dict[int, dict]) -> None:
        self.node_configs = node_configs
        self.ready: dict[str, object] = {}
        self.run_config: dict = {}

    def get_node_ids(self):
        return list(self.node_configs)

    def push_messages(self, messages):
        from flwr.app import Context, RecordDict

        from fedsafe.client.app import app

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            node = m.metadata.dst_node_id
            context = Context(7, node, self.node_configs[node], RecordDict(), self.run_config)
            self.ready[m.object_id] = app(m, context)
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.ready.pop(i) for i in list(message_ids) if i in self.ready]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_the_server_app_stops_before_round_one_a_run_every_real_site_refuses(
    tmp_path, identity
) -> None:
    from fedsafe.server.app import _input_width
    from fedsafe.server.run_folder import RunFolder
    from tests.client.test_app import Site

    sites = {n: Site(tmp_path / f"site-{n}") for n in (1, 2)}
    for n, site in sites.items():
        site.node_config["site-name"] = f"hospital-{n}"
    grid = ClientAppGrid({n: s.node_config for n, s in sites.items()})
    folder = RunFolder(tmp_path / "run")
    grid.run_config = {"scenario": "custom", "dp": False}
    with pytest.raises(RunRefused, match="every site refuses.*hospital-1 refuses dp"):
        _input_width(grid, 2, folder, RunConfig.from_mapping(grid.run_config))
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["run-refused"]
    # An allowed run passes the same check and learns the width.
    grid.run_config = {"scenario": "custom", "num-server-rounds": 2}
    width, _, declared = _input_width(grid, 2, folder, RunConfig.from_mapping(grid.run_config))
    assert width == sites[1].width()
    # What each site declared, for the update checks (fedsafe.server.update_checks).
    assert sorted(declared) == ["hospital-1", "hospital-2"]
    assert all(d.policy is not None and d.public_size >= 1 for d in declared.values())
    assert not sites[1].ledger.exists()  # the query touched no ledger


def test_declared_budgets_are_each_deployed_sites_own_for_the_report() -> None:
    from fedsafe.server.site_policies import declared_budgets

    sites = {
        "b": _deployed("b", budget_epsilon=2.5),
        "a": _deployed("a", budget_epsilon=4.0, delta=1e-5),
        "sim": DeclaredSite("sim", 87, None),
    }
    budgets = declared_budgets(sites)
    assert list(budgets) == ["a", "b"]  # simulated sites declare no budget
    assert budgets["a"] == {"epsilon_max": 4.0, "delta": 1e-5, "source": "declared policy"}
    assert budgets["b"]["epsilon_max"] == 2.5
