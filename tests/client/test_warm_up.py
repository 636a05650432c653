"""The query before round 1 calibrates a simulated site's noise; round 1 uses it, nothing leaves.

Real ClientApp calls (``fedsafe.client.app.app``) with the Message and Context a SuperNode
hands it: the simulated heart sites' shipped data, the real accountant and calibration.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedsafe.client import privacy_state
from fedsafe.client.app import app
from fedsafe.client.mods.privacy_budget import run_noise_choice
from fedsafe.client.site import resolve_site
from fedsafe.client.warm_up import TRAINING_MODULES, warm_up_site
from fedsafe.config import RunConfig
from fedsafe.models import build_model
from fedsafe.privacy.calibration import calibrate_noise_multiplier
from fedsafe.tasks.scenarios import load_scenario

RUN = {"scenario": "heart", "local-steps": 2, "num-server-rounds": 2, "ledger-dir": ""}
SIMULATED = {"partition-id": 1, "num-partitions": 4}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ClientApp process has: its run, node and task ids (replies are stamped)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _context(node_config: dict[str, Any], run_config: dict[str, Any]) -> Context:
    return Context(
        run_id=11, node_id=3, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _message(kind: str, server_round: int = 1) -> Message:
    from flwr.app import ArrayRecord

    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    if kind != MessageType.QUERY:
        width = load_scenario("heart").site(1).num_features
        content["arrays"] = ArrayRecord(build_model("logreg", width, 42).state_dict())
    msg = Message(content, dst_node_id=3, message_type=kind)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does
    return msg


def _choice(context: Context) -> privacy_state.NoiseChoice:
    cfg = RunConfig.from_mapping(context.run_config)
    site = resolve_site(context, cfg)
    delta = site.budget.delta if site.budget is not None else cfg.target_delta
    return run_noise_choice(cfg, site, delta)


def test_the_query_calibrates_the_sites_noise_and_round_one_trains_with_it() -> None:
    context = _context(SIMULATED, RUN)
    reply = app(_message(MessageType.QUERY), context)
    assert not reply.has_error(), reply.error
    # The reply is what it was: the input width, the size and the site's declaration.
    assert {k: set(v) for k, v in reply.content.items()} == {
        "metrics": {"num-features", "num-examples"},
        "site": {"site-name", "feature-names", "site-policy"},
    }
    choice = _choice(context)
    kept = privacy_state.remembered_run_noise(context, choice)
    expected = calibrate_noise_multiplier(
        choice.target_epsilon, choice.delta, choice.sample_rate,
        choice.steps_per_round * choice.rounds, accountant=choice.accountant,
    )  # fmt: skip
    assert kept == expected
    train = app(_message(MessageType.TRAIN), context)
    assert not train.has_error(), train.error
    assert privacy_state.stored_noise(context) == kept


def test_round_one_trains_with_the_kept_noise_of_exactly_its_plan_only() -> None:
    """The kept value is what round 1 uses (so the test can see it: 7.0, not a calibration);
    kept for another plan (another target epsilon), it is not used."""
    context = _context(SIMULATED, RUN)
    privacy_state.remember_run_noise(context, _choice(context), 7.0)
    app(_message(MessageType.TRAIN), context)
    assert privacy_state.stored_noise(context) == 7.0

    other = _context(SIMULATED, {**RUN, "target-epsilon": 2.0})
    privacy_state.remember_run_noise(other, _choice(_context(SIMULATED, RUN)), 7.0)
    app(_message(MessageType.TRAIN), other)
    used = privacy_state.stored_noise(other)
    assert used is not None and used < 7.0
    assert used == privacy_state.run_target_noise(_choice(other))


def test_a_kept_value_that_is_not_a_noise_multiplier_is_never_used() -> None:
    context = _context(SIMULATED, RUN)
    choice = _choice(context)
    with pytest.raises(ValueError, match="finite and > 0"):
        privacy_state.remember_run_noise(context, choice, math.nan)
    for bad in (0.0, -1.0, math.inf, "1.0"):
        context.state.config_records[privacy_state.CALIBRATION_KEY] = ConfigRecord(
            {"choice": privacy_state._choice_key(choice), "noise-multiplier": bad}
        )
        assert privacy_state.remembered_run_noise(context, choice) is None


def test_a_deployed_site_ignores_a_kept_noise_and_its_query_keeps_none(tmp_path: Path) -> None:
    from fedsafe.privacy.ledger import SitePrivacyLedger
    from tests.client.test_app import RUN as DEPLOYED_RUN
    from tests.client.test_app import Site
    from tests.client.test_app import _message as deployed_message

    noise = []
    for name, kept in (("reference", None), ("kept", 40.0)):
        site = Site(tmp_path / name)
        site.node_config["site-name"] = f"hospital-{name}"  # one ledger per site name
        context = _context(site.node_config, DEPLOYED_RUN)
        app(deployed_message(MessageType.QUERY, site.width()), context)
        assert privacy_state.CALIBRATION_KEY not in context.state.config_records
        if kept is not None:  # above the policy's floor, far above the calibrated noise
            privacy_state.remember_run_noise(context, _choice(context), kept)
        reply = app(deployed_message(MessageType.TRAIN, site.width()), context)
        assert not reply.has_error(), reply.error
        with SitePrivacyLedger.open(site.ledger) as ledger:
            noise.append([e.noise_multiplier for e in ledger.events()])
    assert noise[0] == noise[1] and len(noise[0]) == 1 and noise[0][0] < 40.0


def test_no_warm_up_without_dp_and_a_refused_plan_is_left_to_the_train_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = _context(SIMULATED, {**RUN, "dp": False})
    cfg = RunConfig.from_mapping(plain.run_config)
    assert warm_up_site(plain, cfg, resolve_site(plain, cfg)) is None
    # Epsilon 0.05 for 2 x 200 steps at rate 1 by RDP: no noise up to the maximum reaches it.
    refused = _context(
        SIMULATED,
        {**RUN, "accountant": "rdp", "target-epsilon": 0.05, "batch-size": 100000,
         "local-steps": 200},
    )  # fmt: skip
    cfg = RunConfig.from_mapping(refused.run_config)
    with caplog.at_level("WARNING", logger="flwr.fedsafe.client"):
        assert warm_up_site(refused, cfg, resolve_site(refused, cfg)) is None
    assert "warm-up before round 1 skipped (ValueError)" in caplog.text
    assert privacy_state.CALIBRATION_KEY not in refused.state.config_records
    import sys

    assert all(name in sys.modules for name in TRAINING_MODULES)


def test_with_a_lifetime_budget_the_kept_noise_is_only_the_run_targets_part() -> None:
    from fedsafe.privacy.budget import PrivacyBudget

    choice = privacy_state.NoiseChoice(0.0, 1.0, 1e-5, 0.01, 2, 2, "prv")
    kept = privacy_state.run_target_noise(choice)
    budget = PrivacyBudget(0.5, 1e-5)  # below the run's target: the budget needs more noise
    with_budget = privacy_state.choose_noise(choice, budget, [], kept)
    assert with_budget == privacy_state.choose_noise(choice, budget, [])
    assert with_budget > kept
    assert privacy_state.choose_noise(choice, None, [], kept) == kept


def test_a_site_of_a_shared_account_builds_its_mechanisms_distribution_in_the_query(
    tmp_path: Path,
) -> None:
    """MNIST's sites share one account, composed with PLD beyond 8 mechanisms: the query builds
    the site's own mechanism's distribution; a heart site (its own account) builds none."""
    from fedsafe.privacy import incremental_pld

    incremental_pld.clear()
    heart = _context(SIMULATED, {**RUN, "ledger-dir": str(tmp_path / "heart")})
    app(_message(MessageType.QUERY), heart)
    assert incremental_pld._mechanism.cache_info().currsize == 0
    mnist_run = {
        "scenario": "mnist", "mnist-sites": 10, "local-steps": 2, "num-server-rounds": 3,
        "batch-size": 4, "ledger-dir": str(tmp_path / "mnist"),
    }  # fmt: skip
    mnist = _context({"partition-id": 3, "num-partitions": 10}, mnist_run)
    reply = app(_message(MessageType.QUERY), mnist)
    assert not reply.has_error(), reply.error
    choice = _choice(mnist)
    sigma = privacy_state.remembered_run_noise(mnist, choice)
    assert sigma is not None
    info = incremental_pld._mechanism.cache_info()
    assert info.currsize == 1
    incremental_pld._mechanism(choice.sample_rate, sigma, 2)  # the round's mechanism: kept
    assert incremental_pld._mechanism.cache_info().hits == info.hits + 1
    incremental_pld.clear()
