"""The release_check mod: the final reply, evaluation included, carries only declared values."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedsafe.client.mods.release_check import release_check
from fedsafe.client.site_errors import SiteErrorCode, errors_as_codes
from fedsafe.privacy.releases import UndeclaredReleaseError
from fedsafe.protocol import EVALUATION_RECORD
from tests.client.mods.conftest import Site, _message, app_with, new_context, train_message, trained


def test_a_declared_reply_with_an_evaluation_passes(site: Site) -> None:
    def handler(msg: Message, context: Context) -> Message:
        reply = trained(msg, context, **{"bytes-up": 10})
        reply.content[EVALUATION_RECORD] = MetricRecord({"eval-loss": 0.7})
        return reply

    reply = app_with([release_check], handler)(train_message(site.width()), new_context(site))
    assert not reply.has_error()


@pytest.mark.parametrize(
    "leak",
    [
        lambda reply: reply.content.metric_records["metrics"].__setitem__("exact-size", 160),
        lambda reply: reply.content.__setitem__("extra", MetricRecord({"eval-loss": 1.0})),
        lambda reply: reply.content.__setitem__(EVALUATION_RECORD, MetricRecord({"n": 40})),
        lambda reply: reply.content.__setitem__("arrays", ArrayRecord({"records": torch.zeros(3)})),
    ],
    ids=["metric", "record", "evaluation-key", "array-name"],
)
def test_anything_undeclared_stops_the_reply(site: Site, leak) -> None:
    def handler(msg: Message, context: Context) -> Message:
        reply = trained(msg, context)
        leak(reply)
        return reply

    with pytest.raises(UndeclaredReleaseError):
        app_with([release_check], handler)(train_message(site.width()), new_context(site))
    # Behind errors_as_codes, the coordinator gets a code and no name.
    reply = app_with([errors_as_codes, release_check], handler)(
        train_message(site.width()), new_context(site)
    )
    assert reply.error.code == SiteErrorCode.SITE_SETUP


def test_a_query_reply_is_checked_too(site: Site) -> None:
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-rows": 160})}), reply_to=msg)

    with pytest.raises(UndeclaredReleaseError):
        app_with([release_check], query)(
            _message(MessageType.QUERY, site.width()), new_context(site)
        )
