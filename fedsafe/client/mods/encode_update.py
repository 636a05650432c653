"""Site mod: compress the privatized model after DP, on its way out.

Compression is post-processing of the DP-SGD output (Dwork and Roth 2014, Prop. 2.1), so it
runs outside ``ledger_commit`` and the training step, on the model the step returned in
Flower's plain format: with the run's ``compression`` spec, the difference from the global
model as received is encoded (:mod:`fedsafe.client.update_encoding`, error feedback kept in
the context state); ``bytes-up`` is added to the reply either way. The codec's sampling seed is
fresh from ``secrets`` unless the simulated site asked for reproducible noise.
"""

from __future__ import annotations

import hashlib
import secrets

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.client.mods.contract import current_grant
from fedsafe.client.mods.message_kinds import is_train
from fedsafe.client.update_encoding import encode_state_update, received_state
from fedsafe.compression.wire import WIRE_KEY


def codec_seed(key: bytes | None) -> int:
    """The codec's seed: from ``secrets``, or derived from a reproducible round's key."""
    if key is None:
        return secrets.randbits(62)
    return int.from_bytes(hashlib.sha256(b"codec" + key).digest()[:8], "big")


def encode_update(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the step, then encode the model it returned for the wire and add ``bytes-up``."""
    if not is_train(msg):
        return call_next(msg, context)
    grant = current_grant()
    reply = call_next(msg, context)
    if not reply.has_content() or "arrays" not in reply.content.array_records:
        return reply
    returned = reply.content.array_records["arrays"]
    if WIRE_KEY in returned:
        raise ValueError("the train handler returned an encoded model; return the plain model")
    arrays, size = encode_state_update(
        returned.to_torch_state_dict(),
        received_state(msg.content.array_records["arrays"]),
        grant.call.cfg.compression,
        grant.plan.dp,
        context,
        codec_seed(grant.key),
    )
    reply.content["arrays"] = arrays
    metrics = reply.content.metric_records.get("metrics")
    if metrics is None:
        metrics = reply.content["metrics"] = MetricRecord()
    metrics["bytes-up"] = size
    return reply
