"""The encode_update mod: the model the step returned is compressed on its way out, after DP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message

from fedsafe.client.mods.contract import report_event
from fedsafe.client.mods.encode_update import encode_update
from fedsafe.client.mods.ledger_commit import ledger_commit
from fedsafe.client.mods.privacy_budget import privacy_budget
from fedsafe.client.mods.site_policy import site_policy
from fedsafe.compression import decode_update, serialized_size
from fedsafe.compression.wire import WIRE_KEY
from tests.client.mods.conftest import Site, app_with, new_context, train_message, trained
from tests.client.mods.test_ledger_commit import _granted_event


def _shifted(msg: Message, context: Context) -> Message:
    """A step whose model moved by +0.5 in every parameter."""
    report_event(_granted_event())
    reply = trained(msg, context)
    state = reply.content.array_records["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord({k: v + 0.5 for k, v in state.items()})
    return reply


def _app(handler):
    return app_with([site_policy, privacy_budget, encode_update, ledger_commit], handler)


def test_a_compressed_run_sends_the_encoded_difference(site: Site) -> None:
    msg = train_message(site.width())
    reply = _app(_shifted)(msg, new_context(site, compression="int8"))
    arrays = reply.content.array_records["arrays"]
    assert list(arrays) == [WIRE_KEY]
    assert reply.content.metric_records["metrics"]["bytes-up"] == serialized_size(arrays)
    for diff in decode_update(arrays).values():
        np.testing.assert_allclose(diff, 0.5, atol=0.01)


def test_an_uncompressed_run_sends_the_model_as_returned(site: Site) -> None:
    reply = _app(_shifted)(train_message(site.width()), new_context(site))
    arrays = reply.content.array_records["arrays"]
    assert WIRE_KEY not in arrays
    assert reply.content.metric_records["metrics"]["bytes-up"] == serialized_size(arrays)


def test_a_handler_that_encodes_itself_is_refused(site: Site) -> None:
    def encoded(msg: Message, context: Context) -> Message:
        reply = _shifted(msg, context)
        reply.content["arrays"] = ArrayRecord({WIRE_KEY: torch.zeros(3)})
        return reply

    with pytest.raises(ValueError, match="encoded model"):
        _app(encoded)(train_message(site.width()), new_context(site))
