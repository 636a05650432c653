"""``fedsafe privacy plan`` and ``fedsafe privacy show``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import SitePrivacyLedger

PLAN = ["privacy", "plan", "--epsilon", "1", "--delta", "1e-4", "--rounds", "4"]
PLAN += ["--steps", "100", "--batch-size", "4", "--n", "199", "--accountant", "rdp"]


def test_plan_prints_noise_and_epsilon_per_round(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(PLAN) == 0
    out = capsys.readouterr().out
    sigma = float(re.search(r"noise multiplier: ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert sigma > 0.5
    rows = re.findall(r"^\s+(\d)\s+([0-9.]+)\s+([0-9.]+)$", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    eps = [float(r[1]) for r in rows]
    assert eps == sorted(eps) and 0.98 <= eps[-1] <= 1.0


def test_plan_with_ledger_accounts_for_spent_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "l.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        ledger.record("old", 1, PoissonGaussianEvent(0.02, 3.0, 100), 1.0, 1e-4, "sha256:d", "rdp")
    assert main([*PLAN, "--ledger", str(path), "--fingerprint", "sha256:d"]) == 0
    out = capsys.readouterr().out
    assert "(1 recorded releases)" in out
    spent = float(re.search(r"already spent: ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert spent > 0


def test_plan_and_show_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.sqlite"
    assert main(["privacy", "show", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1
    assert main([*PLAN, "--ledger", str(missing)]) == 2
    assert "--fingerprint" in capsys.readouterr().err
    assert not missing.exists()


def test_show_lists_entries_and_spending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "l.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        for r in (1, 2):
            last = ledger.record(
                "run-x", r, PoissonGaussianEvent(0.02, 1.0, 10), 1.0, 1e-5, "sha256:d", "rdp"
            )
    assert main(["privacy", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 entries, chain verified" in out
    assert out.count("run-x") == 2
    assert f"epsilon {last.epsilon_after:.4f} at delta 1e-05 (rdp), 2 releases in 1 runs" in out


@pytest.mark.parametrize("cmd", [["privacy", "plan"], ["privacy", "show"], ["privacy"]])
def test_help_has_examples(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*cmd, "--help"])
    assert info.value.code == 0
    assert "examples:\n  fedsafe privacy" in capsys.readouterr().out


def test_plan_refuses_a_delta_at_or_above_one_over_n(capsys) -> None:
    from fedsafe.cli.main import main as fedsafe_main

    argv = ["privacy", "plan", "--epsilon", "1", "--rounds", "15", "--steps", "10"]
    assert fedsafe_main([*argv, "--batch-size", "4", "--n", "50", "--delta", "0.05"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--delta" in err and "1/(10 n)" in err


def test_ledger_migrate_refuses_then_migrates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.privacy.test_ledger_anchor import _unkeyed_ledger

    path = tmp_path / "site-a.sqlite"
    _unkeyed_ledger(path, 2)
    assert main(["privacy", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ledger-migrate" in err and "Traceback" not in err
    argv = ["privacy", "ledger-migrate", "--ledger", str(path), "--by", "dpo", "--reason", "up"]
    assert main(argv) == 0
    assert "site-a.v1.sqlite" in capsys.readouterr().out
    assert main(["privacy", "show", str(path)]) == 0
    assert main(argv) == 2  # already keyed: nothing to migrate, one line
    assert "not a format-1 ledger" in capsys.readouterr().err


def test_show_with_the_secrets_folder_missing_creates_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # attack13b: `privacy show` (and `plan --ledger`) opened the ledger with the default
    # secrets loader, which writes a new site key into a missing folder: the folder the admin
    # is about to restore from its backup then held a foreign key.
    path = tmp_path / "site" / "l.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        ledger.record("r" * 32, 1, PoissonGaussianEvent(0.02, 1.0, 10), 1.0, 1e-5, "d", "rdp")
    lost = tmp_path / "secrets" / "lost"
    monkeypatch.setenv("FEDSAFE_LEDGER_SECRETS", str(lost))
    assert main(["privacy", "show", str(path)]) == 2
    assert "ledger.key" in capsys.readouterr().err
    assert not lost.exists()


def test_show_never_states_a_lifetime_below_an_epsilon_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An account moved from PRV to PLD composes lower than it recorded: show the recorded."""
    from fedsafe.privacy.accounting import PRV_MECHANISM_LIMIT, epsilon

    runs = [PoissonGaussianEvent(0.02, 1.0 + 0.05 * i, 50) for i in range(PRV_MECHANISM_LIMIT)]
    tiny = PoissonGaussianEvent(0.02, 5.0, 1)
    path = tmp_path / "l.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        written = [
            ledger.record(f"run-{i}", 1, e, 1.0, 1e-5, "sha256:d") for i, e in enumerate(runs)
        ]
        ledger.record("run-9", 1, tiny, 1.0, 1e-5, "sha256:d")
    composed = epsilon([*runs, tiny], 1e-5, "pld")
    recorded = written[-1].epsilon_after
    assert f"{composed:.4f}" != f"{recorded:.4f}"
    assert main(["privacy", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"lifetime epsilon {recorded:.4f} at delta 1e-05 (pld; the largest recorded" in out
    assert main(["privacy", "show", str(path), "--accountant", "pld"]) == 0
    out = capsys.readouterr().out
    assert f"lifetime epsilon {composed:.4f} at delta 1e-05 (pld; {recorded:.4f} recorded" in out
