"""The site_policy mod: a run the site's policy refuses reaches nothing inside it."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, MessageType

from fedsafe.client.mods.contract import ModOrderError, current_site_call
from fedsafe.client.mods.site_policy import site_policy
from fedsafe.client.site_errors import RunConfigRejected
from tests.client.mods.conftest import Site, _message, app_with, new_context, trained


def test_a_refused_run_gets_the_refusal_and_the_handler_never_runs(site: Site) -> None:
    called: list[str] = []

    def handler(msg: Message, context: Context) -> Message:
        called.append(msg.metadata.message_type)
        return trained(msg, context)

    app = app_with([site_policy], handler)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = app(_message(kind, site.width()), new_context(site, **{"noise-multiplier": 0.1}))
        assert dict(reply.content.metric_records["metrics"]) == {"refused": 1}
        assert reply.content.config_records["site"]["refused-setting"] == "noise-multiplier"
    assert called == []
    assert not site.ledger.exists()


def test_an_accepted_run_binds_the_site_call_for_the_call_only(site: Site) -> None:
    seen = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(current_site_call())
        return trained(msg, context)

    app_with([site_policy], handler)(_message(MessageType.TRAIN, site.width()), new_context(site))
    (call,) = seen
    assert call.site.name == "hospital-a" and call.site.policy == site.policy
    assert call.cfg.local_steps == 3
    with pytest.raises(ModOrderError):
        current_site_call()


def test_an_unreadable_run_config_is_rejected_but_a_query_is_not_checked_here(site: Site) -> None:
    app = app_with([site_policy], trained)
    with pytest.raises(RunConfigRejected):
        app(_message(MessageType.TRAIN, site.width()), new_context(site, **{"batch-size": "x"}))

    def query(msg: Message, context: Context) -> Message:
        return Message(msg.content, reply_to=msg)

    reply = app_with([site_policy], query)(
        _message(MessageType.QUERY, site.width()), new_context(site, **{"batch-size": "x"})
    )
    assert not reply.has_error()
