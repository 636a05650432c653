"""Site mod: nothing leaves that the privacy report does not declare.

Every reply of every handler is checked on its way out, after every mod inside has added to
it: each record's name, each key of each metric and config record
(:func:`fedsafe.privacy.releases.check_reply`), the round protocol's ``evaluation`` record
(declared test-split metrics only), and each array name, which must be one the coordinator
sent (the global model's parameter names) or the compressed wire format's key. An undeclared
value stops the reply: the coordinator gets error code 4102 and the name stays in the site's
log.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.client.update_encoding import received_state
from fedsafe.compression.wire import WIRE_KEY
from fedsafe.privacy.releases import check_reply, check_reply_keys
from fedsafe.protocol import EVALUATION_RECORD


def sent_array_names(msg: Message, reply: Message) -> frozenset[str]:
    """The array names a reply to ``msg`` may carry: those received, and the wire key."""
    received = msg.content.array_records.get("arrays") if msg.has_content() else None
    if received is None:
        return frozenset({WIRE_KEY})
    names = frozenset(received) | {WIRE_KEY}
    returned = reply.content.array_records.get("arrays")
    if WIRE_KEY in received and returned is not None and not set(returned) <= names:
        # The global model came compressed: its parameter names are inside the payload.
        names |= frozenset(received_state(received))
    return names


def check_declared(msg: Message, reply: Message) -> None:
    """Raise :class:`~fedsafe.privacy.releases.UndeclaredReleaseError` on anything undeclared."""
    content = reply.content
    evaluation = content.metric_records.get(EVALUATION_RECORD)
    rest = RecordDict(
        {k: v for k, v in content.items() if not (k == EVALUATION_RECORD and v is evaluation)}
    )
    check_reply(rest, sent_array_names(msg, reply))
    if evaluation is not None:
        check_reply_keys(list(evaluation.keys()))


def release_check(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Check every record, key and array name of the reply before it leaves."""
    reply = call_next(msg, context)
    if reply.has_content():
        check_declared(msg, reply)
    return reply
