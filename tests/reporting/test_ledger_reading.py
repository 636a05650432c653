"""A report reads a ledger without writing to it, and says whether it extends its anchor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.errors import UserError
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import LedgerTamperedError, SitePrivacyLedger
from fedsafe.privacy.ledger_anchor import LedgerSecrets
from fedsafe.reporting.ledger_reading import read_ledger

EVENT = PoissonGaussianEvent(0.05, 1.0, 20)
FP = "sha256:" + "d" * 64


def _record(path: Path, rounds: range) -> None:
    with SitePrivacyLedger.open(path) as ledger:
        for r in rounds:
            ledger.record("run", r, EVENT, 1.0, 1e-5, FP, "rdp")


def test_verified_and_read_only(tmp_path: Path, ledger_secrets: Path) -> None:
    path = tmp_path / "site" / "ledger.sqlite"
    _record(path, range(1, 3))
    anchor = LedgerSecrets.load().anchor_path(path.resolve())
    before = (path.read_bytes(), anchor.read_bytes())
    reading = read_ledger(path)
    assert reading.anchor == "verified" and len(reading.entries) == 2
    assert (path.read_bytes(), anchor.read_bytes()) == before


def test_an_older_copy_restored_is_a_mismatch_in_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "site" / "ledger.sqlite"
    _record(path, range(1, 2))
    backup = tmp_path / "backup.sqlite"
    shutil.copy(path, backup)
    _record(path, range(2, 4))
    shutil.copy(backup, path)  # the admin restores last week's copy
    with pytest.raises(LedgerTamperedError, match="truncated or an older copy restored"):
        SitePrivacyLedger.open(path)  # training refuses it ...
    reading = read_ledger(path)  # ... and the report says why
    assert reading.anchor == "mismatch" and "holds 1 entries, its anchor 3" in reading.anchor_detail
    assert main(["report", str(path), "--site", "hospital-a", "--out", str(tmp_path / "r")]) == 0
    assert "anchor of hospital-a: mismatch" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["sites"][0]["anchor"] == "mismatch"


def test_a_ledger_without_its_anchor_is_missing(tmp_path: Path, ledger_secrets: Path) -> None:
    path = tmp_path / "site" / "ledger.sqlite"
    _record(path, range(1, 2))
    for anchor in (ledger_secrets / "anchors").glob("*.json"):
        anchor.unlink()
    assert read_ledger(path).anchor == "missing"


def test_no_site_key_here_is_one_clear_error_and_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "site" / "ledger.sqlite"
    _record(path, range(1, 2))
    elsewhere = tmp_path / "no-secrets"
    monkeypatch.setenv("FEDSAFE_LEDGER_SECRETS", str(elsewhere))
    with pytest.raises(UserError, match="ledger key .* does not exist"):
        read_ledger(path)
    assert not elsewhere.exists()
    assert main(["report", str(path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_policy_flag_on_a_run_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "rounds.jsonl").write_text('{"round": 1, "sites": {"s": {"epsilon": 0.5}}}\n')
    assert main(["report", str(run), "--policy", "policy.toml"]) == 2
    assert "--site and --policy apply to a ledger file" in capsys.readouterr().err
    missing = tmp_path / "site" / "ledger.sqlite"
    _record(missing, range(1, 2))
    assert main(["report", str(missing), "--policy", str(tmp_path / "nope.toml")]) == 2
    assert "--policy" in capsys.readouterr().err


def test_the_ledger_report_shows_who_opened_a_new_account_and_why(
    tmp_path: Path, ledger_secrets: Path
) -> None:
    from fedsafe.privacy.new_account import open_new_account
    from fedsafe.reporting.report_data import load_ledger_file

    path = tmp_path / "site" / "ledger.sqlite"
    _record(path, range(1, 3))
    assert not any("New account" in n for n in load_ledger_file(path).notes)
    open_new_account(path, by="dpo@site-a", why="disk replaced")
    notes = " ".join(load_ledger_file(path, site="site-a").notes)
    assert "New account opened" in notes and "by dpo@site-a (disk replaced)" in notes
    assert "2 releases carried over" in notes
