"""The handler_timing mod: start and end lines in the site's own log, even when a handler fails."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Context, Message, MessageType

from fedsafe.client.mods.handler_timing import handler_timing
from tests.client.mods.conftest import Site, _message, app_with, new_context


def test_start_and_end_are_logged_around_a_failing_handler(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(msg: Message, context: Context) -> Message:
        raise RuntimeError("boom")

    with caplog.at_level(logging.DEBUG, logger="flwr.fedsafe.client"):
        with pytest.raises(RuntimeError):
            app_with([handler_timing], failing)(
                _message(MessageType.EVALUATE, site.width()), new_context(site)
            )
    assert [r.getMessage() for r in caplog.records] == [
        "fedsafe: evaluate handler start",
        "fedsafe: evaluate handler end",
    ]
