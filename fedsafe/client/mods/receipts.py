"""Site mod: the coordinator's receipt must be extended by the site's ledger (issue 13).

The coordinator sends, with each training message, the last receipt it kept for the site
(:class:`~fedsafe.privacy.receipts.LedgerReceipt`, record ``receipt``). Before anything trains
or touches the budget, a site whose ledger does not extend it (missing, truncated, replaced or
rolled back together with its secrets folder) answers with the typed refusal
``refused-setting = ledger-receipt``. Receipts only ever refuse: the site never adopts one as its
state. On the way out, after ``ledger_commit`` committed the round's event, the reply carries
the ledger's own receipt in its ``site`` record (keys
:data:`~fedsafe.privacy.receipts.RECEIPT_KEYS`).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.client.handler_ledger import ledger_scope, site_ledger
from fedsafe.client.mods.contract import current_site_call
from fedsafe.client.mods.message_kinds import is_train
from fedsafe.client.mods.privacy_budget import ledger_account, trains_with_dp
from fedsafe.client.policy import PolicyRefusal
from fedsafe.client.site_replies import refusal_reply
from fedsafe.privacy.receipts import LedgerReceipt, refusal

#: Name of the record carrying the coordinator's receipt in a training message.
RECEIPT_RECORD = "receipt"
#: The refused setting of a site whose ledger does not extend the coordinator's receipt.
RECEIPT_SETTING = "ledger-receipt"


def received_receipt(msg: Message) -> LedgerReceipt | None:
    """The coordinator's receipt in ``msg``, or None; ``ValueError`` if malformed."""
    record = msg.content.config_records.get(RECEIPT_RECORD) if msg.has_content() else None
    if record is None:
        return None
    return LedgerReceipt.from_metrics(dict(record))


def ledger_receipts(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a receipt the ledger does not extend; add the ledger's receipt to the reply.

    The mods inside share the ledger it opens (:mod:`fedsafe.client.handler_ledger`).
    """
    if not is_train(msg):
        return call_next(msg, context)
    with ledger_scope():
        return _with_receipts(msg, context, call_next)


def _with_receipts(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    call = current_site_call()
    path = call.site.ledger_path or None if trains_with_dp(call.cfg, call.site) else None
    try:
        receipt = received_receipt(msg)
    except ValueError as exc:
        return refusal_reply(msg, call.site, PolicyRefusal(RECEIPT_SETTING, str(exc)))
    if receipt is not None and path is not None:
        reason: str | None
        if receipt.count > 0 and not Path(path).exists():
            reason = (
                "the site has no ledger but the coordinator holds a receipt: the ledger was lost"
            )
        else:
            with site_ledger(path, account=ledger_account(call.site)) as ledger:
                reason = refusal(ledger, receipt)
        if reason is not None:
            return refusal_reply(msg, call.site, PolicyRefusal(RECEIPT_SETTING, reason))
    reply = call_next(msg, context)
    if path is None or not reply.has_content() or not Path(path).exists():
        return reply
    metrics = reply.content.metric_records.get("metrics")
    if metrics is not None and "refused" in metrics:
        return reply  # a refusal carries exactly its declared keys
    site = reply.content.config_records.get("site")
    if site is None:
        return reply
    with site_ledger(path, account=ledger_account(call.site)) as ledger:
        site.update(LedgerReceipt.of(ledger).to_metrics())
    return reply
