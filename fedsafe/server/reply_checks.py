"""Checks on what a site sends back, before anything is aggregated.

A reply is dropped (and the reason logged) if it is an error, carries no model, carries a
compressed update that does not decode, or carries a model whose tensors do not match the
global model's names and shapes or hold non-finite values. One bad site never stops the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedsafe.compression import MalformedPayloadError, decode_update
from fedsafe.compression.wire import WIRE_KEY
from fedsafe.server.site_identity import site_identity


@dataclass(frozen=True, slots=True)
class SiteReply:
    """A reply that passed the checks, reduced to what aggregation needs."""

    node_id: int
    site: str
    metrics: dict[str, float]
    arrays: ArrayRecord | None
    #: The reply's ``site`` record as sent (untrusted: a hook parses what it reads).
    site_values: dict[str, Any] = field(default_factory=dict)


class ReplyRejected(ValueError):
    """A reply that must be dropped, with the reason."""


#: Longest reported site name kept (a name is a key of ``rounds.jsonl`` and of events).
MAX_SITE_NAME = 100


def site_name(content: RecordDict, node_id: int) -> str:
    """The site's admitted name (:mod:`fedsafe.server.site_identity`); else its reported name.

    A reported name is cut to :data:`MAX_SITE_NAME` characters before it is used or logged.
    """
    record = content.config_records.get("site")
    reported = None if record is None or "site-name" not in record else str(record["site-name"])
    if reported is not None and len(reported) > MAX_SITE_NAME:
        reported = reported[:MAX_SITE_NAME] + "..."
    return site_identity(node_id, reported)


def metrics_of(content: RecordDict) -> dict[str, float]:
    """The reply's metrics as plain floats (lists are ignored)."""
    record = content.metric_records.get("metrics")
    if record is None:
        raise ReplyRejected("reply has no 'metrics' record")
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def check_arrays(arrays: ArrayRecord, reference: ArrayRecord) -> None:
    """Raise :class:`ReplyRejected` unless ``arrays`` matches ``reference`` and is finite."""
    if list(arrays.keys()) != list(reference.keys()):
        raise ReplyRejected(
            f"model tensors {sorted(arrays.keys())} differ from the global model's "
            f"{sorted(reference.keys())}"
        )
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise ReplyRejected(f"tensor {key!r} has shape {got.shape}, expected {ref.shape}")
        if not np.all(np.isfinite(got.numpy())):
            raise ReplyRejected(f"tensor {key!r} holds non-finite values")


def sanitized(
    arrays: ArrayRecord, num_examples: float, metrics: Mapping[str, float] | None = None
) -> RecordDict:
    """The only content a strategy sees: the model, its weight and ``metrics``.

    ``metrics`` must already be free of privacy figures (the caller strips them).
    """
    record = MetricRecord({**(metrics or {}), "num-examples": int(num_examples)})
    return RecordDict({"arrays": arrays, "metrics": record})


def reply_error(msg: Message) -> str | None:
    """The error reason of a reply that carries one, else None."""
    return str(msg.error.reason) if msg.has_error() else None


def dense_arrays(content: RecordDict, global_arrays: ArrayRecord) -> ArrayRecord:
    """The site's model from its reply: plain weights, or a compressed update to decode.

    Parameters
    ----------
    content
        The reply's content; its model is the ``arrays`` record.
    global_arrays
        The global model as the site decoded it (the update is added to it).

    Raises
    ------
    ReplyRejected
        If there is no model, or the compressed payload is malformed (the reply is dropped).
    """
    if "arrays" not in content.array_records:
        raise ReplyRejected("reply carries no model ('arrays')")
    record = content.array_records["arrays"]
    reference = global_arrays.to_numpy_ndarrays()
    names = list(global_arrays.keys())
    layout = [(name, tuple(ref.shape)) for name, ref in zip(names, reference, strict=True)]
    try:
        # Plain or compressed, every declared size is checked against the model first.
        update = decode_update(record, layout)
    except MalformedPayloadError as exc:
        raise ReplyRejected(f"malformed update: {exc}") from None
    if WIRE_KEY not in record:
        return record
    if list(update) != names:
        raise ReplyRejected(f"compressed update has tensors {list(update)}, expected {names}")
    dense = {}
    for name, ref in zip(names, reference, strict=True):
        if update[name].shape != ref.shape:
            raise ReplyRejected(
                f"compressed tensor {name!r} has shape {update[name].shape}, expected {ref.shape}"
            )
        dense[name] = (ref + update[name]).astype(ref.dtype)
    return ArrayRecord({k: Array(v) for k, v in dense.items()})
