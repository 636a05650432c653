"""A real deployed site on disk (CSV, schema, policy file, SQLite ledger) for the mod tests."""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from tests.client.test_app import RUN, Site, _context, _message, site, task_identity

__all__ = ["RUN", "Site", "_context", "_message", "site", "task_identity", "app_with", "trained"]


def app_with(mods: list[Mod], handler: Any) -> ClientApp:
    """A real ClientApp with ``mods`` around ``handler`` for train and evaluate messages."""
    app = ClientApp(mods=mods)
    app.train()(handler)
    app.evaluate()(handler)
    app.query()(handler)
    return app


def trained(msg: Message, context: Context, **metrics: Any) -> Message:
    """A reply carrying the received model unchanged, as a handler that trained would."""
    content = RecordDict(
        {
            "arrays": msg.content.array_records["arrays"],
            "metrics": MetricRecord({"num-examples": 90, **metrics}),
        }
    )
    return Message(content, reply_to=msg)


def train_message(width: int, server_round: int = 1) -> Message:
    return _message(MessageType.TRAIN, width, server_round)


def new_context(site: Site, **run: Any) -> Context:
    return _context(site.node_config, {**RUN, **run})
