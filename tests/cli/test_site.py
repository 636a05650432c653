"""``fedsafe site init`` writes the site's policy; ``site start`` needs it (exit 2 without)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.client.policy import load_policy, public_size_of
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
    return data, schema


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
    assert flower_pids(tmp_path) == set()
