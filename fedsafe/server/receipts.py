"""The coordinator's anchor of each site's privacy ledger: its last receipt (issue 13).

:class:`LedgerReceipts` is a :class:`~fedsafe.server.strategy.SiteHooks`. It keeps the last
receipt (:class:`~fedsafe.privacy.receipts.LedgerReceipt`) of each admitted site from the
``site`` record of its accepted train replies, sends it back in the ``receipt`` record of each
training message to that site (a site whose ledger does not extend it refuses to train:
:mod:`fedsafe.client.mods.receipts`), and drops a reply whose receipt goes back (lower lifetime
epsilon or fewer entries) or is malformed. The receipts are saved beside the run
(``receipts.json`` in the run folder) after each accepted reply, so a resumed run keeps them.

The coordinator is not trusted for the guarantee: it can forget or withhold a receipt, which
only removes this check. A receipt never lowers what a site spends.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsafe.privacy.receipts import RECEIPT_KEYS, LedgerReceipt, lifetime_went_down
from fedsafe.server.reply_checks import ReplyRejected, SiteReply
from fedsafe.server.run_folder import RunFolder
from fedsafe.server.strategy import SiteHooks

log = logging.getLogger("flwr.fedsafe.server")

#: File of the run folder holding the last receipt per site.
RECEIPTS_FILE = "receipts.json"
#: Record of a training message carrying the site's last receipt.
RECEIPT_RECORD = "receipt"


class LedgerReceipts(SiteHooks):
    """Keep, send and check each site's ledger receipt.

    Parameters
    ----------
    folder
        The run folder; receipts are read from and written to ``folder.path / receipts.json``.
    """

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.path = folder.path / RECEIPTS_FILE
        self.receipts: dict[str, LedgerReceipt] = {}
        self._site_of_node: dict[int, str] = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            self.receipts = {
                str(name): LedgerReceipt.from_metrics(values) for name, values in saved.items()
            }

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
        """Keep the accepted reply's receipt (and which node the site answers from)."""
        self._site_of_node[reply.node_id] = reply.site
        receipt = self._receipt_of(reply)
        if receipt is None:
            return
        self.receipts[reply.site] = receipt
        self.folder.write_json(
            RECEIPTS_FILE, {name: r.to_metrics() for name, r in sorted(self.receipts.items())}
        )

    @staticmethod
    def _receipt_of(reply: SiteReply) -> LedgerReceipt | None:
        values = {k: reply.site_values[k] for k in RECEIPT_KEYS if k in reply.site_values}
        if not values:
            return None
        try:
            return LedgerReceipt.from_metrics(values)
        except ValueError as exc:
            raise ReplyRejected(str(exc)) from None
