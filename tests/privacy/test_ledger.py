"""Ledger: durability under SIGKILL, tamper evidence, composition of recorded events."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedsafe.errors import BudgetExhaustedError, UserError
from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.fingerprint import dataset_fingerprint, fingerprint_bytes
from fedsafe.privacy.ledger import LedgerEntry, LedgerTamperedError, SitePrivacyLedger

FP = fingerprint_bytes(b"records", b"schema")
OTHER = fingerprint_bytes(b"other records")
EVENT = PoissonGaussianEvent(sample_rate=0.02, noise_multiplier=1.1, steps=50)
REPO = Path(__file__).resolve().parents[2]


def _fill(path: Path, n: int = 3) -> list[LedgerEntry]:
    with SitePrivacyLedger.open(path) as ledger:
        return [
            ledger.record("run-1", r, EVENT, 1.0, 1e-5, FP, accountant="rdp")
            for r in range(1, n + 1)
        ]


def _raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER entries_no_update")
    conn.execute("DROP TRIGGER entries_no_delete")
    return conn


def test_record_persists_and_composes(tmp_path: Path) -> None:
    path = tmp_path / "site.sqlite"
    written = _fill(path)
    with SitePrivacyLedger.open(path) as ledger:
        read = ledger.entries()
        assert read == written
        assert [e.seq for e in read] == [1, 2, 3]
        assert read[1].prev_hash == read[0].entry_hash
        for k, entry in enumerate(read, start=1):
            assert entry.epsilon_after == pytest.approx(epsilon([EVENT] * k, 1e-5, "rdp"))
        # composition is tighter than adding per-round epsilons
        assert read[-1].epsilon_after < 3 * read[0].epsilon_after
        assert ledger.spent(FP, 1e-5, "rdp") == pytest.approx(read[-1].epsilon_after)
        assert ledger.spent(OTHER, 1e-5, "rdp") == ledger.spent(FP, 1e-5, "rdp")  # one account
        assert ledger.head() == (3, read[-1].entry_hash)


def test_data_versions_compose_in_one_account(tmp_path: Path) -> None:
    """A new data version labels its entries but never opens a fresh account (issue 13)."""
    with SitePrivacyLedger.open(tmp_path / "l.sqlite") as ledger:
        ledger.record("r", 1, EVENT, 1.0, 1e-5, FP, accountant="rdp")
        other = ledger.record("r", 1, EVENT, 1.0, 1e-5, OTHER, accountant="rdp")
        assert other.epsilon_after == pytest.approx(epsilon([EVENT, EVENT], 1e-5, "rdp"))
        assert ledger.fingerprints() == [FP, OTHER]
        assert ledger.events(OTHER) == [EVENT, EVENT]
        assert len(ledger.entries(FP)) == 1


def test_fresh_handle_sees_other_handles_entries(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with SitePrivacyLedger.open(path) as a, SitePrivacyLedger.open(path) as b:
        a.record("r", 1, EVENT, 1.0, 1e-5, FP, accountant="rdp")
        second = b.record("r", 2, EVENT, 1.0, 1e-5, FP, accountant="rdp")
        assert second.seq == 2
        assert second.epsilon_after == pytest.approx(epsilon([EVENT] * 2, 1e-5, "rdp"))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_budget_cap_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with SitePrivacyLedger.open(path) as ledger:
        first = ledger.record("r", 1, EVENT, 1.0, 1e-5, FP, accountant="rdp", epsilon_max=10.0)
        with pytest.raises(BudgetExhaustedError, match="round 2"):
            ledger.record(
                "r", 2, EVENT, 1.0, 1e-5, FP, accountant="rdp", epsilon_max=first.epsilon_after
            )
        assert len(ledger.entries()) == 1


def test_entries_are_append_only_in_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    _fill(path, 1)
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE entries SET delta = 0.5")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM entries")


def test_edited_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    _fill(path)
    conn = _raw(path)
    conn.execute("UPDATE entries SET event = replace(event, '1.1', '9.9') WHERE seq = 2")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerTamperedError, match=r"entry seq 2 was edited") as info:
        SitePrivacyLedger.open(path)
    assert str(path) in str(info.value)


def test_edited_entry_with_recomputed_unkeyed_hash_is_refused(tmp_path: Path) -> None:
    """Without the site key a recomputed SHA-256 is not the entry's MAC (issue 13)."""
    path = tmp_path / "l.sqlite"
    entries = _fill(path)
    from dataclasses import replace

    forged = replace(entries[1], epsilon_after=0.01)
    conn = _raw(path)
    conn.execute(
        "UPDATE entries SET epsilon_after = ?, entry_hash = ? WHERE seq = 2",
        (0.01, forged.expected_hash()),
    )
    conn.commit()
    conn.close()
    with pytest.raises(LedgerTamperedError, match=r"entry seq 2 was edited"):
        SitePrivacyLedger.open(path)


@pytest.mark.parametrize(("deleted", "named"), [(1, 1), (2, 2), (3, 3)])
def test_deleted_entry_is_named(tmp_path: Path, deleted: int, named: int) -> None:
    path = tmp_path / "l.sqlite"
    _fill(path)
    conn = _raw(path)
    conn.execute("DELETE FROM entries WHERE seq = ?", (deleted,))
    conn.commit()
    conn.close()
    with pytest.raises(LedgerTamperedError, match=rf"entry seq {named} was deleted"):
        SitePrivacyLedger.open(path)


def test_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        SitePrivacyLedger.open(tmp_path / "nope.sqlite", create=False)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserError, match=str(junk)):
        SitePrivacyLedger.open(junk)


def test_entry_validation() -> None:
    with pytest.raises(ValueError, match="delta"):
        LedgerEntry(1, "r", 1, EVENT, 1.0, 1.5, 0.1, "prv", FP, "t", "0" * 64, "")
    with pytest.raises(ValueError, match="accountant"):
        LedgerEntry(1, "r", 1, EVENT, 1.0, 1e-5, 0.1, "moments", FP, "t", "0" * 64, "")


def test_fingerprints(tmp_path: Path) -> None:
    data, schema = tmp_path / "d.csv", tmp_path / "s.yaml"
    data.write_bytes(b"a,b\n1,2\n")
    schema.write_bytes(b"a: int\n")
    assert dataset_fingerprint(data, schema) == fingerprint_bytes(b"a,b\n1,2\n", b"a: int\n")
    assert dataset_fingerprint(data) != dataset_fingerprint(data, schema)
    assert fingerprint_bytes(b"ab", b"c") != fingerprint_bytes(b"a", b"bc")
    with pytest.raises(UserError, match="missing.csv"):
        dataset_fingerprint(tmp_path / "missing.csv")


CHILD = textwrap.dedent(
    """
    import sys
    from fedsafe.privacy.events import PoissonGaussianEvent
    from fedsafe.privacy.ledger import SitePrivacyLedger
    path = sys.argv[1]
    for r in range(1, 100000):
        with SitePrivacyLedger.open(path) as ledger:
            # pld imports no torch, so the child starts fast
            e = ledger.record("run", r, PoissonGaussianEvent(0.01, 1.0, 10),
                              1.0, 1e-5, "sha256:data", accountant="pld")
        print(e.seq, flush=True)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_mid_write_loses_no_committed_entry(tmp_path: Path) -> None:
    path = tmp_path / "site.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt, wait_for in enumerate((3, 7)):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        acknowledged: list[int] = []
        deadline = time.monotonic() + 60
        while len(acknowledged) < wait_for and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged.append(int(line))
        # Kill at an uneven moment, most likely inside a transaction.
        time.sleep(0.003 * (attempt + 1))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        acknowledged += [int(x) for x in proc.stdout.read().split()]
        assert proc.returncode == -signal.SIGKILL
        assert len(acknowledged) >= wait_for
        with SitePrivacyLedger.open(path) as ledger:
            seqs = [e.seq for e in ledger.entries()]
        # every acknowledged (committed) entry survived; at most one committed, unacknowledged
        assert set(acknowledged) <= set(seqs)
        assert len(seqs) - max(acknowledged) <= 1
    # the ledger still accepts new entries after the crashes
    with SitePrivacyLedger.open(path) as ledger:
        entry = ledger.record("after", 1, EVENT, 1.0, 1e-5, "sha256:data", accountant="rdp")
        assert entry.seq == len(seqs) + 1


# -- verified once on open, incrementally after -------------------------------------------


def test_reopen_in_the_same_process_hashes_only_new_entries(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    _fill(path, 4)
    with SitePrivacyLedger.open(path) as ledger:
        assert ledger.hashed_on_open == 0  # _fill verified and wrote all four here
        assert ledger.verify() == 4
    with SitePrivacyLedger.open(path) as a, SitePrivacyLedger.open(path) as b:
        a.record("r", 5, EVENT, 1.0, 1e-5, FP, accountant="rdp")
        assert [e.seq for e in b.entries()] == [1, 2, 3, 4, 5]  # b verifies seq 5 only
    with SitePrivacyLedger.open(path) as ledger:
        assert ledger.hashed_on_open == 0
        assert len(ledger.entries(FP)) == 5


def test_edit_of_a_verified_entry_is_found_on_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    _fill(path)
    with SitePrivacyLedger.open(path) as ledger:
        assert ledger.hashed_on_open == 0
        conn = _raw(path)
        conn.execute("UPDATE entries SET clip_norm = 9.0 WHERE seq = 1")
        conn.commit()
        conn.close()
        # the open ledger keeps composing the entries it verified
        assert ledger.entries()[0].clip_norm == 1.0
    with pytest.raises(LedgerTamperedError, match=r"entry seq 1 was edited"):
        SitePrivacyLedger.open(path)


def test_deletion_while_open_is_refused_before_recording(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    _fill(path)
    with SitePrivacyLedger.open(path) as ledger:
        conn = _raw(path)
        conn.execute("DELETE FROM entries WHERE seq = 2")
        conn.commit()
        conn.close()
        with pytest.raises(LedgerTamperedError, match=r"entry seq 2 was deleted"):
            ledger.record("r", 4, EVENT, 1.0, 1e-5, FP, accountant="rdp")
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 2


def test_foreign_append_that_breaks_the_chain_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    entries = _fill(path, 2)
    with SitePrivacyLedger.open(path) as ledger:
        from dataclasses import replace

        forged = replace(entries[1], seq=3, prev_hash="f" * 64)
        forged = replace(forged, entry_hash=forged.expected_hash())
        conn = sqlite3.connect(path)
        conn.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                3,
                "r",
                3,
                '{"kind": "poisson_gaussian", "noise_multiplier": 1.1, '
                '"sample_rate": 0.02, "steps": 50}',
                1.0,
                1e-5,
                forged.epsilon_after,
                "rdp",
                FP,
                forged.created_at,
                forged.prev_hash,
                forged.entry_hash,
            ),
        )
        conn.commit()
        conn.close()
        with pytest.raises(LedgerTamperedError, match=r"entry seq 3 does not chain"):
            ledger.events(FP)


def test_an_account_of_many_mechanisms_is_composed_with_pld_and_never_below_it(
    tmp_path: Path,
) -> None:
    """Sites sharing one source: beyond the limit the commit composes incremental PLD."""
    from fedsafe.privacy.accounting import PRV_MECHANISM_LIMIT, epsilon_full_composition

    sites = [
        PoissonGaussianEvent(0.01 + 0.001 * i, 1.0 + 0.02 * i, 2)
        for i in range(PRV_MECHANISM_LIMIT + 2)
    ]
    with SitePrivacyLedger.open(tmp_path / "shared.sqlite") as ledger:
        written = [ledger.record("run-1", 1, e, 1.0, 1e-5, FP) for e in sites]
        written += [ledger.record("run-1", 2, e, 1.0, 1e-5, FP) for e in sites[:3]]
        cap = written[-1].epsilon_after
        with pytest.raises(BudgetExhaustedError):
            ledger.record("run-1", 2, sites[3], 1.0, 1e-5, FP, epsilon_max=cap)
        assert len(ledger.entries()) == len(written)
    names = [e.accountant for e in written]
    assert names == ["prv"] * PRV_MECHANISM_LIMIT + ["pld"] * (len(written) - PRV_MECHANISM_LIMIT)
    for k, entry in enumerate(written, start=1):
        events = [e.event for e in written[:k]]
        assert entry.epsilon_after >= epsilon_full_composition(events, 1e-5, "pld")
    # PLD is tighter than PRV's upper end, but the account's lifetime (the largest value
    # recorded) never goes down.
    assert written[-1].epsilon_after > max(e.epsilon_after for e in written[:PRV_MECHANISM_LIMIT])


def test_a_commit_composed_before_the_lock_includes_an_entry_appended_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accountant runs before the write lock; an entry another process appended between
    that composition and the lock is composed in (the entry's epsilon is the full one)."""
    import fedsafe.privacy.ledger as ledger_module

    path = tmp_path / "site.sqlite"
    other_event = PoissonGaussianEvent(sample_rate=0.05, noise_multiplier=0.9, steps=20)
    _fill(path, 1)
    real = ledger_module.account_epsilon
    calls: list[int] = []

    def composing(events, delta, accountant):  # the real accountant; the first call lets
        calls.append(len(events))  # another handle commit before the write lock is taken
        if len(calls) == 1:
            with SitePrivacyLedger.open(path) as other:
                other.record("run-2", 1, other_event, 1.0, 1e-5, FP, accountant="rdp")
        return real(events, delta, accountant)

    with SitePrivacyLedger.open(path) as ledger:
        monkeypatch.setattr(ledger_module, "account_epsilon", composing)
        entry = ledger.record("run-1", 2, EVENT, 1.0, 1e-5, FP, accountant="rdp")
    assert calls == [2, 2, 3]  # before the lock (2), the other handle (2), again under it (3)
    assert entry.seq == 3
    assert entry.epsilon_after == pytest.approx(
        epsilon([EVENT, other_event, EVENT], 1e-5, "rdp"), rel=1e-12
    )
    assert entry.epsilon_after > epsilon([EVENT, EVENT], 1e-5, "rdp")


def test_a_commit_with_no_entry_appended_meanwhile_composes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedsafe.privacy.ledger as ledger_module

    path = tmp_path / "site.sqlite"
    _fill(path, 2)
    real = ledger_module.account_epsilon
    calls: list[int] = []
    monkeypatch.setattr(
        ledger_module,
        "account_epsilon",
        lambda events, delta, accountant: (
            calls.append(len(events)) or real(events, delta, accountant)
        ),
    )
    with SitePrivacyLedger.open(path) as ledger:
        entry = ledger.record("run-1", 3, EVENT, 1.0, 1e-5, FP, accountant="rdp")
    assert calls == [3]
    assert entry.epsilon_after == pytest.approx(epsilon([EVENT] * 3, 1e-5, "rdp"), rel=1e-12)


class _Died(BaseException):
    """The process dies here."""


@pytest.mark.parametrize("dies_at", ["write_anchors", "connect"])
def test_a_process_dying_while_a_new_ledger_is_anchored_does_not_lock_the_site_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_at: str
) -> None:
    # attack17f: kill -9 between the SQLite file's creation and its anchors ("write_anchors"),
    # or between the path's first anchor and the file ("connect"): nothing was spent, and the
    # next open must work, and still record and anchor.
    import fedsafe.privacy.ledger as ledger_module

    anchored_new_id = ledger_module._anchored_new_id

    def dies(*args: object) -> None:
        if dies_at == "connect":
            anchored_new_id(*args)  # type: ignore[arg-type]
        raise _Died

    path = tmp_path / "ledger.sqlite"
    with monkeypatch.context() as patch:
        name = "_anchored_new_id" if dies_at == "connect" else "write_anchors"
        patch.setattr(ledger_module, name, dies)
        with pytest.raises(_Died):
            SitePrivacyLedger.open(path)
    assert path.exists() == (dies_at == "write_anchors")
    with SitePrivacyLedger.open(path) as ledger:
        assert ledger.entries() == []
    entries = _fill(path, 2)
    with SitePrivacyLedger.open(path) as ledger:
        assert ledger.entries() == entries
    path.unlink()  # the ledger with its releases deleted: still refused
    with pytest.raises(LedgerTamperedError, match="missing"):
        SitePrivacyLedger.open(path)
