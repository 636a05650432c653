"""Site mod: debug lines around every handler, in the site's own log only.

Shown with ``FLWR_LOG_LEVEL=DEBUG``; :mod:`fedsafe.transport.timeline` reads them to split a
round's time between loading the ClientApp process and the work itself.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

# A child of Flower's logger, so messages appear in the SuperNode's logs.
log = logging.getLogger("flwr.fedsafe.client")


def handler_timing(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Log ``fedsafe: <type> handler start`` and ``... end`` around the handler."""
    kind = msg.metadata.message_type
    log.debug("fedsafe: %s handler start", kind)
    try:
        return call_next(msg, context)
    finally:
        log.debug("fedsafe: %s handler end", kind)
