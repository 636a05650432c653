"""An explicit new account: carries the old releases, never opens below the known lifetime."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from fedsafe.cli.main import main
from fedsafe.errors import UserError
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.ledger import LedgerTamperedError, SitePrivacyLedger
from fedsafe.privacy.new_account import OPENING_KEY, open_new_account, read_account_opening

EVENT = PoissonGaussianEvent(0.05, 1.2, 20)
DELTA = 1e-5


def _ledger(folder: Path, releases: int) -> Path:
    path = folder / "ledgers" / "site-a.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        for rnd in range(1, releases + 1):
            ledger.record("r" * 32, rnd, EVENT, 1.0, DELTA, "site-records", "prv")
    return path


def test_a_replaced_ledger_is_reconciled_from_its_backup_with_who_and_why(tmp_path) -> None:
    path = _ledger(tmp_path, 3)
    backup = tmp_path / "backup.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        lifetime, head = ledger.lifetime_epsilon(), ledger.head()
    shutil.copy(path, backup)
    path.unlink()
    SitePrivacyLedger.open(path.with_name("other.sqlite")).close()
    shutil.move(path.with_name("other.sqlite"), path)  # another (empty) ledger in its place
    with pytest.raises(LedgerTamperedError, match="replaced"):
        SitePrivacyLedger.open(path)
    opening, kept = open_new_account(path, by="dpo@site-a", why="disk replaced", source=backup)
    assert kept is not None and kept.exists() and kept.name.startswith("site-a.closed-")
    assert opening.carried == 3 and opening.opening_epsilon == pytest.approx(lifetime)
    assert dict(opening.known_floors)["anchor"] == pytest.approx(lifetime)
    with SitePrivacyLedger.open(path) as ledger:
        assert ledger.head() == head  # the same chain: the coordinator's receipt still holds
        ledger.record("n" * 32, 1, EVENT, 1.0, DELTA, "site-records", "prv")
        # The next release composes onto every carried one (never a fresh 0).
        assert ledger.lifetime_epsilon() == pytest.approx(epsilon([EVENT] * 4, DELTA, "prv"))
    assert read_account_opening(path) == opening
    assert opening.to_dict()["by"] == "dpo@site-a" and opening.to_dict()["why"] == "disk replaced"


@pytest.mark.parametrize("how", ["older backup", "receipt above"])
def test_a_new_account_never_opens_below_a_known_lifetime(tmp_path, how) -> None:
    path = _ledger(tmp_path, 2)
    backup = tmp_path / "backup.sqlite"
    shutil.copy(path, backup)
    with SitePrivacyLedger.open(path) as ledger:
        ledger.record("r" * 32, 3, EVENT, 1.0, DELTA, "site-records", "prv")
    before = path.read_bytes()
    kwargs = {"source": backup} if how == "older backup" else {"receipt_epsilon": 50.0}
    with pytest.raises(UserError, match="releases are missing"):
        open_new_account(path, by="dpo", why="restore", **kwargs)
    assert path.read_bytes() == before and not list(path.parent.glob("*.closed-*"))


def test_an_edited_opening_record_is_caught(tmp_path) -> None:
    path = _ledger(tmp_path, 1)
    open_new_account(path, by="dpo", why="moved")
    conn = sqlite3.connect(path, isolation_level=None)
    raw = conn.execute("SELECT value FROM meta WHERE key = ?", (OPENING_KEY,)).fetchone()[0]
    conn.execute(
        "UPDATE meta SET value = ? WHERE key = ?", (raw.replace('"dpo"', '"nobody"'), OPENING_KEY)
    )
    conn.close()
    with pytest.raises(LedgerTamperedError, match="opening was edited"):
        read_account_opening(path)


def test_the_command_records_who_and_why_and_refuses_a_blank_in_one_line(tmp_path, capsys):
    path = _ledger(tmp_path, 1)
    assert main(["privacy", "new-account", "--ledger", str(path), "--who", " ", "--why", "x"]) == 2
    err = capsys.readouterr().err
    assert "--who and --why" in err and len(err.strip().splitlines()) == 1
    code = main(["privacy", "new-account", "--ledger", str(path), "--who", "dpo@site-a",
                 "--why", "new disk"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "opened by dpo@site-a: 1 releases carried over" in out
    assert main(["privacy", "show", str(path)]) == 0
    assert "by dpo@site-a (new disk): 1 releases carried" in capsys.readouterr().out


def test_a_new_account_never_opens_below_a_copy_that_went_further(tmp_path) -> None:
    # attack13b: the ledger copied to a second folder, the site pointed at the copy, which
    # spent on; back at the first path the copy-anchor refuses the ledger, so the admin opens
    # a new account there. The copy's releases must not be forgotten.
    path = _ledger(tmp_path, 2)
    copy = tmp_path / "elsewhere" / "site-a.sqlite"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    with SitePrivacyLedger.open(copy) as ledger:
        for rnd in (3, 4, 5):
            ledger.record("r" * 32, rnd, EVENT, 1.0, DELTA, "site-records", "prv")
        further = ledger.lifetime_epsilon()
    with pytest.raises(LedgerTamperedError, match="behind a copy"):
        SitePrivacyLedger.open(path)
    before = path.read_bytes()
    with pytest.raises(UserError, match=r"releases are missing.*copy"):
        open_new_account(path, by="dpo", why="the site refused its ledger")
    assert path.read_bytes() == before and not list(path.parent.glob("*.closed-*"))
    opening, _ = open_new_account(path, by="dpo", why="carry the copy", source=copy)
    assert opening.carried == 5 and opening.opening_epsilon == pytest.approx(further)
    assert dict(opening.known_floors)["copy"] == pytest.approx(further)


def test_a_deployed_sites_account_follows_its_new_account(tmp_path) -> None:
    # attack13b: the account binding named the replaced ledger's id, whose anchor holds
    # entries, so the site's own new account was refused as "not site a's account".
    path = tmp_path / "ledgers" / "site-a.sqlite"
    with SitePrivacyLedger.open(path, account="site-a") as ledger:
        ledger.record("r" * 32, 1, EVENT, 1.0, DELTA, "site-records", "prv")
        spent = ledger.lifetime_epsilon()
    open_new_account(path, by="dpo", why="moved disks")
    with SitePrivacyLedger.open(path, account="site-a") as ledger:
        assert ledger.lifetime_epsilon() == pytest.approx(spent)
    # Still one account: another ledger for the site is refused.
    with pytest.raises(UserError, match="not site site-a's account"):
        SitePrivacyLedger.open(tmp_path / "other.sqlite", account="site-a")


def test_another_sites_ledger_is_not_carried_into_this_sites_account(tmp_path) -> None:
    # attack13b: two sites sharing one secrets folder (one key). Site b's ledger spent more,
    # so --from it passed every floor, and site a's new account held site b's releases.
    path = _ledger(tmp_path, 2)
    other = tmp_path / "b" / "site-b.sqlite"
    with SitePrivacyLedger.open(other) as ledger:
        for rnd in (1, 2, 3):
            ledger.record("b" * 32, rnd, EVENT, 1.0, DELTA, "site-records", "prv")
    before = path.read_bytes()
    with pytest.raises(UserError, match="another ledger"):
        open_new_account(path, by="dpo", why="restore", source=other)
    assert path.read_bytes() == before and not list(path.parent.glob("*.closed-*"))
    # A backup of its own ledger, even after an earlier new account, is carried.
    backup = tmp_path / "backup.sqlite"
    shutil.copy(path, backup)
    open_new_account(path, by="dpo", why="moved disks")
    opening, _ = open_new_account(path, by="dpo", why="restore", source=backup)
    assert opening.carried == 2


def test_the_accounts_budget_record_follows_its_new_account(tmp_path) -> None:
    from fedsafe.privacy.ledger_anchor import LedgerSecrets, account_budget_key, checked_budget

    path = tmp_path / "ledgers" / "site-a.sqlite"
    with SitePrivacyLedger.open(path, account="site-a") as ledger:
        ledger.record("r" * 32, 1, EVENT, 1.0, DELTA, "site-records", "prv")
        old_id = ledger.ledger_id
    keys = LedgerSecrets.load()
    assert checked_budget(keys, "site-a", 1.0, DELTA, key=account_budget_key(old_id)) is None
    open_new_account(path, by="dpo", why="moved disks")
    with SitePrivacyLedger.open(path, account="site-a") as ledger:
        new_id = ledger.ledger_id
    assert new_id != old_id
    # A larger budget under any name is still no raise for the account's new ledger.
    assert checked_budget(keys, "renamed", 3.0, DELTA, key=account_budget_key(new_id))


def test_a_release_committed_by_a_site_holding_the_old_ledger_is_not_lost(tmp_path) -> None:
    # attack13b: a site process held the ledger open (mid-round) while the admin ran
    # new-account; its commit then went into the WAL new-account had unlinked: "committed",
    # the release would leave, and no file held the entry.
    path = _ledger(tmp_path, 1)
    held = SitePrivacyLedger.open(path)
    try:
        open_new_account(path, by="dpo", why="tidy up")
        with pytest.raises(LedgerTamperedError, match="replaced while this process held it"):
            held.record("r" * 32, 2, EVENT, 1.0, DELTA, "site-records", "prv")
    finally:
        held.close()
    with SitePrivacyLedger.open(path) as ledger:
        assert [e.round for e in ledger.entries()] == [1]
