"""The privacy_budget mod: noise, caps and budget decided before training, then a typed grant."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message

from fedsafe.client.app import app
from fedsafe.client.mods.contract import RoundGrant, current_grant
from fedsafe.client.mods.privacy_budget import privacy_budget
from fedsafe.client.mods.site_policy import site_policy
from fedsafe.client.site import resolve_site
from fedsafe.config import RunConfig
from fedsafe.errors import UserError
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger
from fedsafe.protocol import FEDSAFE_RUN_ID
from tests.client.mods.conftest import Site, app_with, new_context, train_message, trained

RUN_ID = "a7" * 16


def _granting_app(grants: list[RoundGrant]):
    def handler(msg: Message, context: Context) -> Message:
        grants.append(current_grant())
        return trained(msg, context)

    return app_with([site_policy, privacy_budget], handler)


def test_the_grant_holds_the_sites_noise_and_the_public_rate(site: Site) -> None:
    grants: list[RoundGrant] = []
    _granting_app(grants)(train_message(site.width()), new_context(site))
    (grant,) = grants
    assert grant.plan.dp and grant.key is None and not grant.not_private
    assert grant.plan.noise_multiplier >= site.policy.min_noise_multiplier
    assert grant.plan.sample_rate == pytest.approx(1 / 12)  # 1 / ceil(public 90 / batch 8)
    assert grant.plan.local_steps == 3 and grant.server_round == 1


def test_a_round_beyond_the_run_is_refused_before_the_handler(site: Site) -> None:
    grants: list[RoundGrant] = []
    context = new_context(site, **{"num-server-rounds": 1})
    fingerprint = resolve_site(context, RunConfig.from_mapping(context.run_config)).fingerprint
    with SitePrivacyLedger.open(site.ledger) as ledger:
        # This run's round 1 (no fedsafe run id in the message: Flower's run id keys it).
        ledger.record(str(context.run_id), 1, PoissonGaussianEvent(1 / 12, 2.0, 3), 1.0, 1e-5,
                      fingerprint)  # fmt: skip
    reply = _granting_app(grants)(train_message(site.width(), 2), context)
    assert reply.content.config_records["site"]["refused-setting"] == "num-server-rounds"
    assert grants == []


def test_an_exhausted_budget_gets_the_typed_reply_and_no_training(site: Site) -> None:
    context = new_context(site)
    fingerprint = resolve_site(context, RunConfig.from_mapping(context.run_config)).fingerprint
    with SitePrivacyLedger.open(site.ledger) as ledger:
        # One round of very little noise spends far more than the policy's lifetime budget.
        ledger.record("earlier", 1, PoissonGaussianEvent(0.5, 0.3, 50), 1.0, 1e-4, fingerprint)
    before = site.ledger_bytes()
    grants: list[RoundGrant] = []
    reply = _granting_app(grants)(train_message(site.width()), context)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["budget-exhausted"] == 1 and metrics["epsilon"] > site.policy.budget_epsilon
    assert "arrays" not in reply.content
    assert grants == [] and site.ledger_bytes() == before


def test_a_model_reply_carries_the_public_size_whatever_the_handler_wrote(site: Site) -> None:
    def leaky(msg: Message, context: Context) -> Message:
        return trained(msg, context, **{"num-examples": 160})  # the exact training-set size

    reply = app_with([site_policy, privacy_budget], leaky)(
        train_message(site.width()), new_context(site)
    )
    assert reply.content.metric_records["metrics"]["num-examples"] == 90


def _run_round(site: Site, rnd: int) -> dict[str, float]:
    """One round of fedsafe's run RUN_ID at the real ClientApp, in a fresh process state."""
    msg = train_message(site.width(), rnd)
    msg.content["config"][FEDSAFE_RUN_ID] = RUN_ID
    reply = app(msg, new_context(site))  # a new Context: the site process restarted
    assert not reply.has_error(), reply.error
    return dict(reply.content.metric_records["metrics"])


def test_a_site_restarted_mid_run_reports_the_runs_true_epsilon(site: Site) -> None:
    context = new_context(site)
    cfg = RunConfig.from_mapping(context.run_config)
    fingerprint = resolve_site(context, cfg).fingerprint
    with SitePrivacyLedger.open(site.ledger) as ledger:  # an earlier run on the same records
        ledger.record("earlier", 1, PoissonGaussianEvent(1 / 12, 3.0, 3), 1.0, 1e-5, fingerprint)
    first, second = _run_round(site, 1), _run_round(site, 2)
    with SitePrivacyLedger.open(site.ledger) as ledger:
        entries = ledger.run_entries(RUN_ID)
        lifetime = ledger.lifetime_epsilon()
    assert [e.round for e in entries] == [1, 2]
    # The noise fixed in round 1 is kept after the restart (read back from the ledger).
    assert entries[0].event == entries[1].event
    run = epsilon([e.event for e in entries], site.policy.delta, cfg.accountant)
    assert second["run-epsilon"] == pytest.approx(run, rel=1e-9)
    assert second["run-epsilon"] > first["run-epsilon"]  # not restarted from zero
    assert first["run-epsilon"] == pytest.approx(
        epsilon([entries[0].event], site.policy.delta, cfg.accountant), rel=1e-9
    )
    assert second["epsilon"] == pytest.approx(lifetime) and lifetime > run  # the earlier run too


def test_a_deployed_site_pointed_at_a_fresh_ledger_does_not_start_again_at_zero(
    site: Site, tmp_path
) -> None:
    # attack13: the same site, its node config's ledger-path changed (another working folder).
    with SitePrivacyLedger.open(site.ledger, account="hospital-a") as ledger:
        ledger.record("earlier", 1, PoissonGaussianEvent(1 / 12, 2.0, 3), 1.0, 1e-4, "site")
    moved = tmp_path / "elsewhere" / "ledger.sqlite"
    site.node_config["ledger-path"] = str(moved)
    grants: list[RoundGrant] = []
    with pytest.raises(UserError, match=f"its spending is in the ledger at {site.ledger}"):
        _granting_app(grants)(train_message(site.width()), new_context(site))
    assert grants == [] and not moved.exists()


def test_a_policy_rewritten_with_a_larger_budget_is_refused_until_the_raise_is_recorded(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    # attack13: `fedsafe site init --force` without --budget-epsilon writes the default 3 over
    # the admin's 1; the site then spent up to 3 on the same records.
    from fedsafe.cli.main import main
    from fedsafe.client.policy import SitePolicy

    site.policy_path.write_text(
        SitePolicy.for_records(160, **{**_POLICY, "budget_epsilon": 1.0}).to_toml()
    )
    grants: list[RoundGrant] = []
    app = _granting_app(grants)
    app(train_message(site.width()), new_context(site))
    assert len(grants) == 1
    site.policy_path.write_text(SitePolicy.for_records(160, **_POLICY).to_toml())  # budget 3
    before = site.ledger_bytes()
    reply = app(train_message(site.width(), 2), new_context(site))
    record = reply.content.config_records["site"]
    assert record["refused-setting"] == "budget-epsilon"
    assert "epsilon 3 at delta 0.001, more than the 1 at delta 0.001" in str(
        record["refusal-reason"]
    )
    assert len(grants) == 1 and site.ledger_bytes() == before
    args = ["privacy", "budget-raise", "--site", "hospital-a", "--policy", str(site.policy_path)]
    assert main([*args, "--by", "dpo", "--reason", ""]) == 2
    assert main([*args, "--by", "dpo@site-a", "--reason", "DPIA 2027"]) == 0
    assert "epsilon 3 at delta 0.001 recorded by dpo@site-a" in capsys.readouterr().out
    app(train_message(site.width(), 2), new_context(site))
    assert len(grants) == 2


_POLICY = {"public_size": 90, "min_records": 20, "max_rounds": 5, "max_local_steps": 20}


def test_a_larger_budget_under_another_site_name_is_refused_too(site: Site) -> None:
    # attack13b: the budget record was kept per site *name*. `site init --force` (default
    # budget 3 over the admin's 1) and a start under another --name (a renamed key file)
    # found no record for the new name, while the account binding let the new name open the
    # same ledger: the account went on spending to 3.
    from fedsafe.client.policy import SitePolicy

    site.policy_path.write_text(
        SitePolicy.for_records(160, **{**_POLICY, "budget_epsilon": 1.0}).to_toml()
    )
    grants: list[RoundGrant] = []
    app = _granting_app(grants)
    app(train_message(site.width()), new_context(site))
    assert len(grants) == 1
    site.policy_path.write_text(SitePolicy.for_records(160, **_POLICY).to_toml())  # budget 3
    site.node_config["site-name"] = "hospital-a-renamed"
    before = site.ledger_bytes()
    reply = app(train_message(site.width(), 2), new_context(site))
    record = reply.content.config_records["site"]
    assert record["refused-setting"] == "budget-epsilon"
    assert len(grants) == 1 and site.ledger_bytes() == before
    from fedsafe.cli.main import main

    args = ["privacy", "budget-raise", "--site", "hospital-a-renamed"]
    args += ["--policy", str(site.policy_path), "--by", "dpo", "--reason", "DPIA 2027"]
    assert main(args) == 0  # the raise, recorded, covers the account the name is bound to
    app(train_message(site.width(), 2), new_context(site))
    assert len(grants) == 2
