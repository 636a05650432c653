"""``fedsafe site init`` writes the site's policy; ``site start`` needs it (exit 2 without)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.client.policy import SitePolicy, load_policy, public_size_of
from fedsafe.data.schema import load_site_data
from fedsafe.transport import pki
from fedsafe.transport.processes import free_port
from tests.transport.conftest import flower_pids, make_pki

SCHEMA = """label: {column: outcome, positive: yes}
drop: [patient_id]
features:
  age: {type: numeric, range: [18, 100], source: "years, adult patients"}
  smoker: {type: categorical, categories: [no, yes]}
"""


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    data, schema = tmp_path / "site.csv", tmp_path / "schema.yaml"
    data.write_text(
        "patient_id,age,smoker,outcome\n"
        + "".join(
            f"{i},{30 + i % 40},{'yes' if i % 3 else 'no'},{'yes' if i % 2 else 'no'}\n"
            for i in range(310)
        )
    )
    schema.write_text(SCHEMA)
    # The site's secret split key decides the training size; a round one (e.g. 210) would equal
    # its public size, so add records until it is not (the key file persists beside the data).
    # Equal records land on the same side, so each added record is new (ages 70-99 are unused).
    for extra in range(60):
        if public_size_of(n := len(load_site_data("x", data, schema).x_train)) < n:
            return data, schema
        with data.open("a") as f:
            f.write(f"{310 + extra},{70 + extra % 30},{'yes' if extra < 30 else 'no'},yes\n")
    raise AssertionError("60 new records never changed a round training size")


def test_init_writes_defaults_from_the_data_and_says_what_it_chose(
    site: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ledger_secrets: Path,
) -> None:
    data, schema = site
    out = tmp_path / "policy.toml"
    args = ["site", "init", "--data", str(data), "--schema", str(schema), "--out", str(out)]
    assert main([*args, "--min-noise-multiplier", "0.8"]) == 0
    printed = capsys.readouterr().out
    n = len(load_site_data("x", data, schema).x_train)
    policy = load_policy(out)
    assert policy.public_size == public_size_of(n) < n  # rounded down: not the exact count
    assert policy.delta <= 1 / (10 * policy.public_size)
    assert policy.min_noise_multiplier == 0.8
    assert "min-noise-multiplier" in printed and "(given)" in printed
    assert f"public-size            {policy.public_size}" in printed
    # The site key that MACs its ledger is made at set-up, private to the site (issue 13).
    key = ledger_secrets / "ledger.key"
    assert str(key) in printed and (key.stat().st_mode & 0o777) == 0o600
    # An existing policy is kept unless --force.
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert main([*args, "--force", "--budget-epsilon", "2"]) == 0
    assert load_policy(out).budget_epsilon == 2.0


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--delta", "0.5"), ("--min-noise-multiplier", "0"), ("--max-rounds", "0")],
)
def test_init_refuses_an_impossible_policy_naming_the_flag(
    site: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
) -> None:
    data, schema = site
    out = tmp_path / "policy.toml"
    argv = ["site", "init", "--data", str(data), "--schema", str(schema), "--out", str(out)]
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("how", ["delta between 1/n and 1/public-size", "public size below n"])
def test_init_refuses_a_delta_at_or_above_one_over_the_real_training_size(
    site: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """A careless admin: the policy checks delta against the public size only."""
    data, schema = site
    n = len(load_site_data("x", data, schema).x_train)
    public = public_size_of(n)
    assert public < n  # rounded down, so 1/public > 1/n
    out = tmp_path / "policy.toml"
    argv = ["site", "init", "--data", str(data), "--schema", str(schema), "--out", str(out)]
    if how.startswith("delta"):
        extra = ["--delta", repr((1 / n + 1 / public) / 2)]  # below 1/public, above 1/n
    else:
        extra = ["--public-size", "5"]  # default delta 1/100, far above 1/n
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--delta" in err and f"1/{n}" in err
    assert not out.exists()


def test_start_without_a_policy_stops_before_any_process(
    site: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, schema = site
    pki_dir = make_pki(tmp_path)
    pki.create_site_key(tmp_path, "h1")
    base = [
        "site", "start", "--coordinator", f"127.0.0.1:{free_port()}",
        "--ca", str(pki_dir / "ca.pem"), "--key", str(tmp_path / "h1.key"),
        "--data", str(data), "--schema", str(schema), "--workdir", str(tmp_path / "w"),
    ]  # fmt: skip
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--policy" in err and "fedsafe site init" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\ndelta = 0.9\n")
    assert main([*base, "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err
    # A careless admin starts with a tiny site's policy: valid, but its delta (0.01 for a
    # public size of 5) is not below 1/n for this site's training records.
    n = len(load_site_data("x", data, schema).x_train)
    other = tmp_path / "other-site.toml"
    other.write_text(SitePolicy.for_records(5).to_toml())
    assert SitePolicy.for_records(5).delta >= 1 / n
    assert main([*base, "--policy", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"1/{n}" in err and "site init" in err
    assert flower_pids(tmp_path) == set()


def test_start_from_another_folder_does_not_open_a_fresh_account(
    site: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # attack13: the default workdir (fedsafe-site-NAME) is relative; started from another
    # folder, the site made a fresh policy and ledger there and spent its budget again from 0.
    from fedsafe.privacy.events import PoissonGaussianEvent
    from fedsafe.privacy.ledger import SitePrivacyLedger

    data, schema = site
    pki_dir = make_pki(tmp_path)
    pki.create_site_key(tmp_path, "h1")
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        monkeypatch.chdir(folder)
        init = ["site", "init", "--data", str(data), "--schema", str(schema)]
        assert main([*init, "--out", "fedsafe-site-h1/policy.toml"]) == 0
    ledger = first / "fedsafe-site-h1" / "ledger.sqlite"
    with SitePrivacyLedger.open(ledger, account="h1") as opened:  # what the site spent there
        opened.record("run-1", 1, PoissonGaussianEvent(0.1, 1.0, 10), 1.0, 1e-4, "site-records")
    capsys.readouterr()
    args = [
        "site", "start", "--coordinator", f"127.0.0.1:{free_port()}",
        "--ca", str(pki_dir / "ca.pem"), "--key", str(tmp_path / "h1.key"),
        "--data", str(data), "--schema", str(schema), "--connect-timeout", "5",
    ]  # fmt: skip
    assert main(args) == 2  # from the second folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"its spending is in the ledger at {ledger}" in err
    assert not (second / "fedsafe-site-h1" / "ledger.sqlite").exists()
    assert flower_pids(tmp_path) == set()
