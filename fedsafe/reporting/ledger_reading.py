"""Read a site's privacy ledger for a report: verified, read-only, with its anchor status.

A report must not change what it reports on: :meth:`SitePrivacyLedger.open` creates a missing
site key and moves the ledger's anchor forward, and refuses a ledger that does not extend its
anchor. Here the file is opened read-only (SQLite ``mode=ro``), its keyed hash chain is checked
with the site key (an edited, deleted or reordered entry still stops the report, naming the
entry), and the anchor (:mod:`fedsafe.privacy.ledger_anchor`) is compared, not enforced, so
the report can say which of three states the officer signs:

``verified``
    The ledger extends the anchor the site keeps outside the ledger's folder (same ledger id,
    the anchored entry in place, lifetime epsilon not below the anchored one).
``missing``
    The site's ledger-secrets folder holds no anchor for this ledger path (the ledger was
    moved or copied here, the secrets folder was lost, or the ledger never recorded).
``mismatch``
    The anchor records another ledger, more entries, another entry at its position or a
    higher lifetime epsilon: the ledger was replaced, truncated or rolled back.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fedsafe.errors import UserError
from fedsafe.privacy.ledger import LedgerEntry, SitePrivacyLedger
from fedsafe.privacy.ledger_anchor import LedgerAnchor, LedgerSecrets, read_anchor

#: The anchor states a report shows.
ANCHOR_STATES = ("verified", "missing", "mismatch")


@dataclass(frozen=True, slots=True)
class LedgerReading:
    """A ledger as a report reads it.

    Parameters
    ----------
    path
        The ledger file (absolute).
    entries
        Every entry, in order, its keyed chain verified.
    anchor
        One of :data:`ANCHOR_STATES`.
    anchor_detail
        One sentence: what was compared, or what does not match.
    """

    path: Path
    entries: tuple[LedgerEntry, ...]
    anchor: str
    anchor_detail: str

    def __post_init__(self) -> None:
        if self.anchor not in ANCHOR_STATES:
            raise ValueError(f"anchor must be one of {ANCHOR_STATES}, got {self.anchor!r}")

    @property
    def lifetime_epsilon(self) -> float:
        """The largest recorded ``epsilon_after`` (0 for an empty ledger)."""
        return max((e.epsilon_after for e in self.entries), default=0.0)


def anchor_status(
    anchor: LedgerAnchor | None, ledger_id: str, entries: tuple[LedgerEntry, ...]
) -> tuple[str, str]:
    """Compare a ledger with its anchor: (state, one sentence). See the module docstring."""
    if anchor is None:
        return "missing", (
            "no anchor for this ledger path in the site's ledger-secrets folder: the ledger "
            "was moved or copied, the secrets folder is another, or it never recorded"
        )
    lifetime = max((e.epsilon_after for e in entries), default=0.0)
    if anchor.ledger_id != ledger_id:
        return "mismatch", "the anchor records another ledger (ledger id differs): replaced"
    if len(entries) < anchor.count:
        return "mismatch", (
            f"the ledger holds {len(entries)} entries, its anchor {anchor.count}: truncated or "
            "an older copy restored"
        )
    if anchor.count and entries[anchor.count - 1].entry_hash != anchor.head:
        return "mismatch", f"entry {anchor.count} is not the anchored one: replaced"
    if lifetime < anchor.lifetime_epsilon:
        return "mismatch", (
            f"lifetime epsilon {lifetime:.4g} is below the anchored {anchor.lifetime_epsilon:.4g}"
        )
    return "verified", (
        f"extends its anchor ({anchor.count} entries, lifetime epsilon "
        f"{anchor.lifetime_epsilon:.4g}) kept outside the ledger's folder"
    )


def read_ledger(path: str | Path, secrets_: LedgerSecrets | None = None) -> LedgerReading:
    """Read and verify a ledger without writing to it, its key or its anchor.

    Parameters
    ----------
    path
        The ledger file.
    secrets_
        The site key and anchors; by default the site's ledger-secrets folder
        (``$FEDSAFE_LEDGER_SECRETS``), never created here.

    Raises
    ------
    UserError
        If the file or the site key is missing, the file is not a format-2 fedsafe ledger of
        this site's key, or (:class:`~fedsafe.privacy.ledger.LedgerTamperedError`) an entry was
        edited, deleted or reordered.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"privacy ledger {path} does not exist; check the path")
    keys = secrets_ if secrets_ is not None else LedgerSecrets.load(create=False)
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.DatabaseError as exc:
        raise UserError(f"privacy ledger {path} cannot be opened ({exc})") from None
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") != "2":
            raise UserError(
                f"privacy ledger {path} is not a format-2 (keyed) fedsafe ledger; migrate a "
                "format-1 ledger with `fedsafe privacy ledger-migrate` first"
            )
        if meta.get("key_id") != keys.key_id or not meta.get("ledger_id"):
            raise UserError(
                f"privacy ledger {path} was written with another site key than "
                f"{keys.directory}; run the report at the site, or set FEDSAFE_LEDGER_SECRETS "
                "to its ledger-secrets folder"
            )
        ledger = SitePrivacyLedger(path, conn, keys, str(meta["ledger_id"]))
        ledger.verify()  # the keyed chain, every entry; reads only
        entries = tuple(ledger.entries())
    except sqlite3.DatabaseError as exc:
        raise UserError(
            f"privacy ledger {path} cannot be read as a fedsafe ledger ({exc}); give the path "
            "of a ledger file"
        ) from None
    finally:
        conn.close()
    state, detail = anchor_status(read_anchor(keys, path), str(meta["ledger_id"]), entries)
    return LedgerReading(path, entries, state, detail)
