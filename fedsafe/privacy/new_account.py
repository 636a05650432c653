"""An explicit new privacy account for a site: who opened it, why, and what it carries over.

A site's ledger refuses to open when it does not extend its anchor (deleted, truncated,
replaced, an older copy restored). Reconciling that is the site admin's explicit decision,
recorded in the new ledger (issue 13): :func:`open_new_account` (``fedsafe privacy
new-account``) opens a fresh ledger at the same path that

* carries every release of the old account, re-chained under the site key: the events keep
  their run id, round, mechanism and data version, so the accountant composes them exactly
  (never a running sum of epsilons);
* opens at no less than the account's last known lifetime epsilon: the anchor's, the old
  ledger's, and the coordinator's last receipt if the admin passes it. When the events at hand
  compose to less (a backup missing later releases), nothing is opened: a fresh account at a
  lower epsilon is exactly the rollback the anchor exists to refuse;
* records who opened it, why, when, the previous ledger's id, entry count and head, and the
  opening lifetime epsilon in an authenticated ``account_opening`` meta row
  (:func:`read_account_opening`, for every report);
* keeps the old file beside it (``<name>.closed-<time>.sqlite``) and moves the path's anchor to
  the new ledger.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import sqlite3
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsafe.errors import UserError
from fedsafe.privacy.ledger import (
    _COLUMNS,
    _SCHEMA,
    GENESIS_HASH,
    SCHEMA_VERSION,
    LedgerEntry,
    LedgerTamperedError,
    SitePrivacyLedger,
    _meta,
    _row_to_entry,
    anchor_rewritten_ledger,
)
from fedsafe.privacy.ledger_anchor import (
    AccountBinding,
    LedgerAnchor,
    LedgerSecrets,
    account_budget_key,
    anchor_lock,
    canonical_json,
    read_anchor,
    read_binding,
    read_budget,
    write_binding,
    write_budget,
)

#: Meta key of the new account's opening record.
OPENING_KEY = "account_opening"


@dataclass(frozen=True, slots=True)
class AccountOpening:
    """Who opened a ledger's account, why, and what it carried over.

    Parameters
    ----------
    by, why
        The site admin's name and reason (non-empty).
    at
        ISO 8601 UTC time of the opening.
    opening_epsilon
        The lifetime epsilon the account opened at (>= every known prior figure).
    carried
        Releases carried over from the previous ledger (its entries, re-chained).
    previous_ledger_id, previous_count, previous_head
        The ledger it replaces ("" / 0 / 64 zeros when none was found).
    known_floors
        The figures the opening had to reach: ``anchor``, ``old-ledger``, ``receipt``.
    """

    by: str
    why: str
    at: str
    opening_epsilon: float
    carried: int
    previous_ledger_id: str
    previous_count: int
    previous_head: str
    known_floors: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        if not self.by.strip() or not self.why.strip():
            raise ValueError("an account opening records who opened it and why")
        if not self.opening_epsilon >= 0 or self.carried < 0 or self.previous_count < 0:
            raise ValueError("opening epsilon and counts must be >= 0")
        if any(value > self.opening_epsilon * (1 + 1e-12) for _, value in self.known_floors):
            raise ValueError("an account never opens below a known lifetime epsilon")

    def to_dict(self) -> dict[str, Any]:
        """The opening as plain JSON values (for reports)."""
        return {
            "by": self.by,
            "why": self.why,
            "at": self.at,
            "opening_epsilon": self.opening_epsilon,
            "carried": self.carried,
            "previous_ledger_id": self.previous_ledger_id,
            "previous_count": self.previous_count,
            "previous_head": self.previous_head,
            "known_floors": dict(self.known_floors),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AccountOpening:
        """Parse :meth:`to_dict`'s output; ``ValueError`` when malformed."""
        try:
            return cls(
                str(values["by"]), str(values["why"]), str(values["at"]),
                float(values["opening_epsilon"]), int(values["carried"]),
                str(values["previous_ledger_id"]), int(values["previous_count"]),
                str(values["previous_head"]),
                tuple((str(k), float(v)) for k, v in dict(values["known_floors"]).items()),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed account opening ({exc})") from None


@dataclass(frozen=True, slots=True)
class _OldAccount:
    ledger_id: str
    entries: tuple[LedgerEntry, ...]

    @property
    def lifetime(self) -> float:
        return max((e.epsilon_after for e in self.entries), default=0.0)


def _read_old(path: Path, keys: LedgerSecrets) -> _OldAccount | None:
    """The entries of the ledger file at ``path``, chain-verified under the key (not the anchor)."""
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq").fetchall()
        ledger_id = _meta(conn, "ledger_id") or ""
        key_id = _meta(conn, "key_id")
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path} is not a fedsafe ledger ({exc}); give a ledger file") from None
    finally:
        conn.close()
    if key_id != keys.key_id:
        raise UserError(f"{path} was written with another site key; it cannot be carried over")
    prev, entries = GENESIS_HASH, []
    for seq, row in enumerate(rows, start=1):
        entry = _row_to_entry(path, row)
        if (
            entry.seq != seq
            or entry.prev_hash != prev
            or not hmac.compare_digest(entry.expected_mac(keys), entry.entry_hash)
        ):
            raise LedgerTamperedError(
                f"privacy ledger {path}: entry seq {seq} fails its keyed chain; an edited "
                "ledger is not carried over (give an intact copy with --from)"
            )
        prev = entry.entry_hash
        entries.append(entry)
    return _OldAccount(ledger_id, tuple(entries))


def open_new_account(
    path: str | Path,
    *,
    by: str,
    why: str,
    source: str | Path | None = None,
    receipt_epsilon: float | None = None,
    secrets_: LedgerSecrets | None = None,
) -> tuple[AccountOpening, Path | None]:
    """Open a new account at ``path``, carrying the old releases; see the module docstring.

    Parameters
    ----------
    path
        The site's ledger path (its file, if any, is kept beside it, renamed).
    by, why
        Who opens the account and why (recorded; required).
    source
        The ledger whose releases are carried (default: the file at ``path``), e.g. a backup.
    receipt_epsilon
        The lifetime epsilon of the coordinator's last receipt for this site, if known.
    secrets_
        The site key and anchors (default: the site's secrets folder).

    Returns
    -------
    (AccountOpening, Path or None)
        The opening recorded in the new ledger, and where the old file was kept.

    Raises
    ------
    UserError
        If who or why is empty, the carried releases compose below a known lifetime epsilon
        (the anchor's, the old ledger's or the receipt's), or a file is not a ledger.
    """
    if not by.strip() or not why.strip():
        raise UserError("new-account: --who and --why must say who opens the account and why")
    if receipt_epsilon is not None and not receipt_epsilon >= 0:
        raise UserError(f"new-account: --receipt-epsilon must be >= 0, got {receipt_epsilon}")
    path = Path(path).expanduser().resolve()
    keys = secrets_ if secrets_ is not None else LedgerSecrets.load()
    keys.check_outside(path)
    old_here = _read_old(path, keys) if path.exists() else None
    carried = old_here
    if source is not None:
        carried = _read_old(Path(source).expanduser().resolve(), keys)
        if carried is None:
            raise UserError(f"new-account: --from {source} does not exist; give a ledger copy")
    anchor = read_anchor(keys, path)
    if source is not None and carried is not None:
        _check_same_account(keys, path, anchor, old_here, carried, source)
    floors: dict[str, float] = {}
    if anchor is not None:
        floors["anchor"] = anchor.lifetime_epsilon
    if old_here is not None:
        floors["old-ledger"] = old_here.lifetime
    if receipt_epsilon is not None:
        floors["receipt"] = float(receipt_epsilon)
    copies = _copies_floor(keys, path, anchor, old_here, carried)
    if copies is not None:
        floors["copy"] = copies
    entries = carried.entries if carried is not None else ()
    opening = carried.lifetime if carried is not None else 0.0
    short = {k: v for k, v in floors.items() if v > opening * (1 + 1e-12)}
    if short:
        known = ", ".join(f"{k} {v:.4g}" for k, v in short.items())
        raise UserError(
            f"new-account: the releases at hand ({len(entries)}) compose to lifetime epsilon "
            f"{opening:.4g}, below the account's last known lifetime ({known}): releases are "
            "missing, and a new account below it would roll the budget back; give the newest "
            "copy of the ledger with --from"
        )
    previous = old_here if old_here is not None else carried
    record = AccountOpening(
        by.strip(), why.strip(), datetime.now(UTC).isoformat(timespec="seconds"), opening,
        len(entries), previous.ledger_id if previous else "",
        len(previous.entries) if previous else 0,
        previous.entries[-1].entry_hash if previous and previous.entries else GENESIS_HASH,
        tuple(sorted(floors.items())),
    )  # fmt: skip
    here = len(old_here.entries) if old_here is not None else 0
    kept = _keep_aside(path, here) if path.exists() else None
    new_id = _write_new(path, keys, entries, record)
    replaced = {a.ledger_id for a in (old_here, anchor) if a is not None and a.ledger_id}
    _rebind(keys, replaced, new_id, path)
    with SitePrivacyLedger.open(path, create=False, secrets_=keys) as ledger:
        ledger.verify()
    return record, kept


def _check_same_account(
    keys: LedgerSecrets,
    path: Path,
    anchor: LedgerAnchor | None,
    old_here: _OldAccount | None,
    carried: _OldAccount,
    source: str | Path,
) -> None:
    """Refuse to carry another account's ledger into this path's (attack13b).

    Two sites sharing one ledger-secrets folder write ledgers under the same key: ``--from``
    naming the other site's file (or its backup) passed every check as long as it had spent
    more, and the new account then held the other site's releases in place of this one's.
    The carried ledger must be a copy of a ledger this path held: the anchor's, the file's
    own, or the one the file's account was opened from.
    """
    known = {a.ledger_id for a in (anchor, old_here) if a is not None and a.ledger_id}
    if old_here is not None:
        opened = read_account_opening(path, keys)
        if opened is not None and opened.previous_ledger_id:
            known.add(opened.previous_ledger_id)
    if known and carried.ledger_id not in known:
        raise UserError(
            f"new-account: --from {source} is another ledger (id {carried.ledger_id[:12]}) than "
            f"the one this path held (id {', '.join(sorted(i[:12] for i in known))}); its "
            "releases are not this site's. Give a copy or backup of this site's own ledger"
        )


def _copies_floor(
    keys: LedgerSecrets,
    path: Path,
    anchor: LedgerAnchor | None,
    *ledgers: _OldAccount | None,
) -> float | None:
    """The furthest lifetime epsilon any copy of the replaced or carried ledgers reached.

    A ledger copied elsewhere keeps its id, and the copy that went on moved that id's anchor
    (:meth:`LedgerSecrets.id_anchor_path`) beyond this path's: without it as a floor, a new
    account at the path that fell behind carried the shorter copy and forgot the other's
    releases (attack13b).
    """
    ids = {a.ledger_id for a in ledgers if a is not None and a.ledger_id}
    if anchor is not None:
        ids.add(anchor.ledger_id)
    figures = [
        found.lifetime_epsilon
        for ledger_id in sorted(ids)
        if (found := read_anchor(keys, path, file=keys.id_anchor_path(ledger_id))) is not None
    ]
    return max(figures, default=None)


def _rebind(keys: LedgerSecrets, replaced: set[str], new_id: str, path: Path) -> None:
    """Move every site account bound to a replaced ledger to the new one at ``path``.

    Without this a deployed site's binding named the closed ledger, whose id anchor holds
    entries, and the site refused its own new account (attack13b).
    """
    with anchor_lock(keys):
        for file in sorted((keys.directory / "anchors").glob("site-*.json")):
            try:
                site = str(json.loads(file.read_text())["site"])
            except (ValueError, KeyError, TypeError):
                continue  # read_binding names a malformed binding when the site opens
            bound = read_binding(keys, site)
            if bound is not None and bound.ledger_id in replaced:
                write_binding(keys, AccountBinding(site, new_id, str(path)))
        # The account's budget record follows it too (the tightest of the replaced ones).
        budgets = [
            found
            for ledger_id in sorted(replaced)
            if (found := read_budget(keys, account_budget_key(ledger_id))) is not None
        ]
        if budgets:
            tightest = min(budgets, key=lambda b: (b.epsilon, b.delta))
            write_budget(keys, replace(tightest, site=account_budget_key(new_id)))


def _keep_aside(path: Path, carried: int) -> Path:
    """Rename the old file aside, under its write lock, once its WAL is in the file.

    attack13b: a site process holding the ledger open committed into the WAL this unlinked,
    recorded nowhere. Now the rename happens under the file's write lock with an empty WAL,
    the site's later commit is refused (the path is another file, ``SitePrivacyLedger.record``),
    and a release committed after the old entries were read (``carried`` of them) restores the
    file and refuses the new account.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    kept = path.with_name(f"{path.stem}.closed-{stamp}{path.suffix}")
    wal = Path(str(path) + "-wal")
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        for _ in range(50):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL's entries into the file
            conn.execute("BEGIN IMMEDIATE")  # no writer from here until the rename is done
            if not wal.exists() or wal.stat().st_size == 0:
                break
            conn.execute("ROLLBACK")  # a commit landed in between: checkpoint it too
        else:
            raise UserError(f"new-account: {path} is being written; stop the site and retry")
        now = conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        if now != carried:
            conn.execute("ROLLBACK")
            raise UserError(
                f"new-account: the site recorded a release in {path} meanwhile; stop the site "
                "and run new-account again"
            )
        for suffix in ("-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        os.replace(path, kept)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return kept


def _write_new(
    path: Path, keys: LedgerSecrets, entries: tuple[LedgerEntry, ...], record: AccountOpening
) -> str:
    """Write the new ledger (carried entries re-chained, the opening row) and its anchor.

    Returns the new ledger's id.
    """
    tmp = path.with_name(path.name + ".opening")
    tmp.unlink(missing_ok=True)
    ledger_id = secrets.token_hex(16)
    conn = sqlite3.connect(tmp, isolation_level=None)
    prev = GENESIS_HASH
    try:
        conn.executescript(_SCHEMA)
        conn.execute("BEGIN IMMEDIATE")
        for entry in entries:
            relinked = replace(entry, prev_hash=prev, entry_hash="")
            mac = relinked.expected_mac(keys)
            conn.execute(
                f"INSERT INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.seq, entry.run_id, entry.round,
                    json.dumps(entry.event.to_dict(), sort_keys=True), entry.clip_norm,
                    entry.delta, entry.epsilon_after, entry.accountant,
                    entry.dataset_fingerprint, entry.created_at, prev, mac,
                ),
            )  # fmt: skip
            prev = mac
        opening = record.to_dict()
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "ledger_id": ledger_id,
            "key_id": keys.key_id,
            "head": f"{len(entries)}:{prev}",
            OPENING_KEY: json.dumps({**opening, "mac": keys.mac(canonical_json(opening))}),
        }
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
        conn.execute("COMMIT")
    finally:
        conn.close()
    os.replace(tmp, path)
    # The path's anchor now names the new ledger (explicitly, here).
    anchor_rewritten_ledger(keys, path, ledger_id, len(entries), prev, record.opening_epsilon)
    return ledger_id


def read_account_opening(
    path: str | Path, secrets_: LedgerSecrets | None = None
) -> AccountOpening | None:
    """The authenticated opening record of the ledger at ``path`` (None: never reopened).

    Raises
    ------
    LedgerTamperedError
        If the record was edited (its MAC does not match).
    """
    keys = secrets_ if secrets_ is not None else LedgerSecrets.load()
    path = Path(path).expanduser().resolve()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        raw = _meta(conn, OPENING_KEY)
    finally:
        conn.close()
    if raw is None:
        return None
    try:
        values = json.loads(raw)
        mac = str(values.pop("mac"))
    except (ValueError, KeyError, AttributeError) as exc:
        raise LedgerTamperedError(
            f"privacy ledger {path}: its account opening is malformed"
        ) from exc
    if not hmac.compare_digest(keys.mac(canonical_json(values)), mac):
        raise LedgerTamperedError(
            f"privacy ledger {path}: its account opening was edited (MAC mismatch)"
        )
    return AccountOpening.from_dict(values)
