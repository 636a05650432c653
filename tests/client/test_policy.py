"""The site's policy value: validated on creation, read from its file, checked against a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedsafe.client.policy import (
    PolicyError,
    RunRequest,
    SitePolicy,
    default_delta,
    load_policy,
    policy_refusal,
    public_size_of,
    size_refusal,
)
from fedsafe.errors import UserError

ALLOWED = RunRequest(
    dp=True,
    reproducible_noise=False,
    noise_multiplier=0.0,
    target_epsilon=1.0,
    target_delta=1e-4,
    num_server_rounds=15,
    local_steps=10,
)


@pytest.mark.parametrize(
    ("n", "public"), [(1, 1), (87, 87), (199, 190), (1234, 1200), (60_001, 60_000)]
)
def test_public_size_rounds_down_to_two_significant_digits(n: int, public: int) -> None:
    assert public_size_of(n) == public


def test_removing_one_record_rarely_moves_the_public_size() -> None:
    moved = sum(public_size_of(n) != public_size_of(n - 1) for n in range(101, 1001))
    assert moved == 90  # only at the 90 rounding boundaries among 900 sizes


def test_defaults_follow_the_data() -> None:
    policy = SitePolicy.for_records(199)
    assert policy.public_size == 190
    assert policy.delta == default_delta(190) == 1e-4
    assert policy.delta <= 1 / (10 * policy.public_size)
    assert policy.max_run_epsilon <= policy.budget_epsilon


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("delta", 1 / 190, "delta"),
        ("delta", 1e-15, "delta"),
        ("min_noise_multiplier", 0.0, "min-noise-multiplier"),
        ("budget_epsilon", float("inf"), "budget-epsilon"),
        ("max_run_epsilon", 5.0, "max-run-epsilon"),
        ("max_rounds", 0, "max-rounds"),
        ("public_size", 0, "public-size"),
    ],
)
def test_an_impossible_policy_is_refused_on_creation(field: str, value: float, key: str) -> None:
    good = SitePolicy.for_records(199)
    with pytest.raises(PolicyError, match=f"'{key}'") as info:
        dataclasses.replace(good, **{field: value})
    assert isinstance(info.value, UserError)


def test_the_file_round_trips_and_bad_files_name_themselves(tmp_path: Path) -> None:
    policy = SitePolicy.for_records(500, budget_epsilon=2.0, min_noise_multiplier=0.9)
    path = tmp_path / "policy.toml"
    path.write_text(policy.to_toml())
    assert load_policy(path) == policy
    with pytest.raises(PolicyError, match="does not exist.*site init"):
        load_policy(tmp_path / "missing.toml")
    path.write_text(policy.to_toml().replace("max-rounds = 100", "max-rounds = 1.5"))
    with pytest.raises(PolicyError, match=f"{path}.*max-rounds.*whole"):
        load_policy(path)
    path.write_text(policy.to_toml() + "dp = false\n")
    with pytest.raises(PolicyError, match="unknown dp"):
        load_policy(path)
    path.write_text("[policy\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.delta = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"dp": False}, "dp"),
        ({"reproducible_noise": True}, "reproducible-noise"),
        ({"noise_multiplier": 0.3}, "noise-multiplier"),
        ({"target_delta": 1e-3}, "target-delta"),
        ({"target_epsilon": 1.5}, "target-epsilon"),
        ({"num_server_rounds": 101}, "num-server-rounds"),
        ({"local_steps": 201}, "local-steps"),
    ],
)
def test_a_run_asking_for_less_is_refused_naming_the_setting(change: dict, setting: str) -> None:
    policy = SitePolicy.for_records(199)
    assert policy_refusal(policy, ALLOWED) is None
    refusal = policy_refusal(policy, dataclasses.replace(ALLOWED, **change))
    assert refusal is not None and refusal.setting == setting


def test_more_noise_and_fixed_noise_above_the_least_are_allowed() -> None:
    policy = SitePolicy.for_records(199)
    assert policy_refusal(policy, dataclasses.replace(ALLOWED, noise_multiplier=0.5)) is None
    # With fixed noise the run's epsilon is capped per round at the site, not by the target.
    fixed = dataclasses.replace(ALLOWED, noise_multiplier=2.0, target_epsilon=9.0)
    assert policy_refusal(policy, fixed) is None


def test_size_refusals_reveal_a_code_not_the_count() -> None:
    policy = SitePolicy.for_records(199, min_records=50)
    assert size_refusal(policy, 199, 2) is None
    few = size_refusal(policy, 49, 2)
    assert few is not None and few.setting == "min-records" and "49" not in few.reason
    one = size_refusal(policy, 199, 1)
    assert one is not None and one.setting == "one-class"
