"""One open privacy ledger per train handler, shared by the site mods (issue 17).

A train message passes four places that read the site's ledger: the receipt check
(:mod:`fedsafe.client.mods.receipts`), the release store's look-up of the round
(:mod:`fedsafe.client.release_store`), the budget and noise decision and the commit
(:mod:`fedsafe.client.mods.privacy_budget`, :mod:`fedsafe.client.mods.ledger_commit`), and the
receipt of the reply. Each opened the ledger anew: a SQLite connection, a read of every row,
the anchors read under the anchor lock, about 3 ms each and a lock the other Ray worker waits
for. Inside :func:`ledger_scope` (the ``ledger_receipts`` mod opens it around a train
message), :func:`site_ledger` opens a ledger the first time it is asked for and hands the same
object to the later places; the scope closes it when the handler returns.

What every open checks still happens, once per handler and before anything is trained or
spent (before the evaluation too when the coordinator sent a receipt): the keyed hash chain,
the anchors (no rollback, no replaced file), the account binding. Every later read verifies
the entries other processes appended since
(:meth:`~fedsafe.privacy.ledger.SitePrivacyLedger.entries`) and the commit checks again that
the file is the one opened and that the verified prefix is in place, under the write lock.
Ledgers are shared by (path, account) only: a deployed site's open with its account binding
is never served by one opened without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from fedsafe.privacy.ledger import SitePrivacyLedger

_Key = tuple[str, str | None]

_OPEN: ContextVar[dict[_Key, SitePrivacyLedger] | None] = ContextVar(
    "fedsafe_handler_ledgers", default=None
)


@contextlib.contextmanager
def ledger_scope() -> Iterator[None]:
    """Share the ledgers :func:`site_ledger` opens inside; close them when the block ends.

    Nested scopes share the outermost one.
    """
    if _OPEN.get() is not None:
        yield
        return
    opened: dict[_Key, SitePrivacyLedger] = {}
    token = _OPEN.set(opened)
    try:
        yield
    finally:
        _OPEN.reset(token)
        for ledger in opened.values():
            ledger.close()


@contextlib.contextmanager
def site_ledger(path: str | Path, *, account: str | None = None) -> Iterator[SitePrivacyLedger]:
    """The ledger at ``path``, opened (and verified) once per :func:`ledger_scope`.

    Outside a scope it is opened and closed around the block, as
    :meth:`SitePrivacyLedger.open` does.

    Parameters
    ----------
    path
        The ledger's file.
    account
        The deployed site's name (its account binding), or None; see
        :meth:`SitePrivacyLedger.open`.

    Raises
    ------
    LedgerTamperedError, UserError
        As :meth:`SitePrivacyLedger.open`, on the first open in the scope.
    """
    opened = _OPEN.get()
    if opened is None:
        with SitePrivacyLedger.open(path, account=account) as ledger:
            yield ledger
        return
    key = (str(Path(path).expanduser().resolve()), account)
    if key not in opened:
        opened[key] = SitePrivacyLedger.open(path, account=account)
    yield opened[key]
