"""The coordinator's anchor of each site's privacy ledger: its last receipt (issue 13).

:class:`LedgerReceipts` is a :class:`~fedsafe.server.strategy.SiteHooks`. It keeps the last
receipt (:class:`~fedsafe.privacy.receipts.LedgerReceipt`) of each admitted site from the
``site`` record of its accepted train replies, sends it back in the ``receipt`` record of each
training message to that site (a site whose ledger does not extend it refuses to train:
:mod:`fedsafe.client.mods.receipts`), and drops a reply whose receipt goes back (lower lifetime
epsilon or fewer entries) or is malformed.

Receipts outlive a run. The coordinator-wide store (:data:`STORE_FILE`, one per coordinator,
:func:`store_path`: beside the ledgers when the run config names a ledger folder, as a
simulation does; else beside the admission record in the coordinator's Flower home; else
beside the run folders, in ``out-dir``) is read at run start and rewritten atomically after
each accepted reply, keyed by the site's admitted name (:mod:`fedsafe.server.site_identity`; a
simulated site's own name). So a site whose ledger and secrets folder were restored from an old
copy between runs is refused in the next run. The run folder keeps its own copy
(``receipts.json``: the sites of this run, for the report); a resumed run reads both and keeps,
per site, the receipt further along.

The coordinator is not trusted for the guarantee: it can forget or withhold a receipt, which
only removes this check. A receipt never lowers what a site spends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsafe.durable_files import replace_atomically
from fedsafe.errors import UserError
from fedsafe.privacy.receipts import RECEIPT_KEYS, LedgerReceipt, lifetime_went_down
from fedsafe.server.reply_checks import ReplyRejected, SiteReply
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.strategy import SiteHooks
from fedsafe.strict_json import strict_dumps

log = logging.getLogger("flwr.fedsafe.server")

#: File of the run folder holding the last receipt of each site of the run.
RECEIPTS_FILE = "receipts.json"
#: The coordinator-wide store of the last receipt per site, across runs.
STORE_FILE = "coordinator-receipts.json"
#: Record of a training message carrying the site's last receipt.
RECEIPT_RECORD = "receipt"


def store_path(ledger_dir: str, out_dir: str | Path, admitted: Path | None = None) -> Path:
    """Where the coordinator-wide receipt store lives.

    Parameters
    ----------
    ledger_dir
        The run config's ``ledger-dir`` ("" when none): a simulation's store sits beside its
        ledgers (keyed by simulated site name), so removing the ledgers removes their receipts.
    out_dir
        The folder of the run folders (``out-dir``; the ServerApp passes its run folder's
        parent): the store when there is neither a ledger folder nor an admission record.
    admitted
        The coordinator's admission record (``admitted.json``,
        :func:`fedsafe.server.site_identity.registry_path`): a deployed coordinator's store sits
        beside it, in its Flower home, keyed by the names it admits.
    """
    if ledger_dir:
        return Path(ledger_dir) / STORE_FILE
    if admitted is not None:
        return Path(admitted).parent / STORE_FILE
    return Path(out_dir) / STORE_FILE


def read_receipts(path: Path) -> dict[str, LedgerReceipt]:
    """The receipts saved in ``path`` (none when it does not exist).

    Raises
    ------
    UserError
        If the file is not a JSON object of well-formed receipts (the line names the file).
    """
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        return {str(name): LedgerReceipt.from_metrics(values) for name, values in saved.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(
            f"{path}: unreadable receipt store ({exc}); restore it from its backup, or move it "
            "away to start without receipts (this removes the coordinator's rollback check)"
        ) from None


def _further(a: LedgerReceipt | None, b: LedgerReceipt) -> LedgerReceipt:
    """The receipt further along of two kept for one site."""
    if a is None or (b.count, b.lifetime_epsilon) > (a.count, a.lifetime_epsilon):
        return b
    return a


class LedgerReceipts(SiteHooks):
    """Keep, send and check each site's ledger receipt.

    Parameters
    ----------
    folder
        The run folder; this run's receipts are written to ``folder.path / receipts.json``.
    store
        The coordinator-wide store (:func:`store_path`), read now and rewritten after each
        accepted reply; ``None``: receipts live in the run folder only.

    Raises
    ------
    UserError
        If the store or the run folder's copy is not a well-formed receipt file.
    """

    def __init__(self, folder: RunFolder, store: Path | None = None) -> None:
        self.folder = folder
        self.path = folder.path / RECEIPTS_FILE
        self.store = store
        self.receipts: dict[str, LedgerReceipt] = {}
        self._site_of_node: dict[int, str] = {}
        in_run = read_receipts(self.path)
        self._in_run: set[str] = set(in_run)
        for name, receipt in (read_receipts(store) if store is not None else {}).items():
            self.receipts[name] = receipt
        for name, receipt in in_run.items():
            self.receipts[name] = _further(self.receipts.get(name), receipt)

    def name_nodes(self, names: Mapping[int, str]) -> None:
        """Learn which site answers from which node before its first train reply.

        The ServerApp passes the names of its query replies (admitted names), so round 1 of a
        new run already sends each site its receipt from the store.
        """
        self._site_of_node.update(names)

    def outgoing(self, rnd: int, node: int, content: RecordDict) -> None:
        """Send the site's last receipt with a training message (none before its first)."""
        name = self._site_of_node.get(node)
        receipt = self.receipts.get(name) if name is not None else None
        if receipt is not None:
            content[RECEIPT_RECORD] = ConfigRecord(receipt.to_metrics())

    def check(self, rnd: int, reply: SiteReply, global_arrays: ArrayRecord) -> None:
        """Drop a reply whose receipt is malformed or goes back from the kept one."""
        receipt = self._receipt_of(reply)
        if receipt is None:
            return
        previous = self.receipts.get(reply.site)
        if lifetime_went_down(previous, receipt):
            assert previous is not None
            raise ReplyRejected(
                f"the site's ledger receipt went back (lifetime epsilon "
                f"{receipt.lifetime_epsilon:.4g} after {previous.lifetime_epsilon:.4g}, "
                f"{receipt.count} entries after {previous.count})"
            )

    def accepted(self, rnd: int, reply: SiteReply) -> None:
        """Keep the accepted reply's receipt in the store and the run folder."""
        self._site_of_node[reply.node_id] = reply.site
        receipt = self._receipt_of(reply)
        if receipt is None:
            return
        self.receipts[reply.site] = receipt
        self._in_run.add(reply.site)
        if self.store is not None:
            self._save_store()
        self.folder.write_json(
            RECEIPTS_FILE, {n: self.receipts[n].to_metrics() for n in sorted(self._in_run)}
        )

    def _save_store(self) -> None:
        """Merge into the store as it is on disk now (another run may have written it).

        Per site the receipt further along is kept, so a run that started earlier never takes
        a site's receipt back. A store that became unreadable is left as it is (logged); the
        run folder's copy still holds this run's receipts.
        """
        assert self.store is not None
        try:
            on_disk = read_receipts(self.store)
        except UserError as exc:
            log.error("fedsafe: the receipt store is not updated: %s", exc)
            self.folder.log_event("receipt-store-unreadable", reason=str(exc))
            return
        merged = dict(self.receipts)
        for name, receipt in on_disk.items():
            merged[name] = _further(receipt, merged[name]) if name in merged else receipt
        self.store.parent.mkdir(parents=True, exist_ok=True)
        text = _dumps(merged)
        replace_atomically(self.store, lambda fh: fh.write(text.encode("utf-8")))

    @staticmethod
    def _receipt_of(reply: SiteReply) -> LedgerReceipt | None:
        values = {k: reply.site_values[k] for k in RECEIPT_KEYS if k in reply.site_values}
        if not values:
            return None
        try:
            return LedgerReceipt.from_metrics(values)
        except ValueError as exc:
            raise ReplyRejected(str(exc)) from None


def _dumps(receipts: Mapping[str, LedgerReceipt]) -> str:
    data: dict[str, Any] = {n: r.to_metrics() for n, r in sorted(receipts.items())}
    return strict_dumps(data, indent=2, sort_keys=True) + "\n"
