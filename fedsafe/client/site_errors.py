"""What a site's error may tell the coordinator: a code and a fixed sentence, nothing else.

Flower forwards a ClientApp's exception text to the coordinator (it lands in the run's
``events.jsonl``), and exception text can hold anything: a CSV cell, a file path, a ledger
path. :func:`errors_as_codes` is the ClientApp's outermost mod: it turns every exception into
one of the codes below with its fixed message; the exception itself, with its traceback, goes
only to the site's own log.
"""

from __future__ import annotations

import enum
import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsafe.errors import UserError

log = logging.getLogger("flwr.fedsafe.client")


class SiteErrorCode(enum.IntEnum):
    """Codes a site may send instead of an exception (declared in the privacy report)."""

    RUN_CONFIG = 4101
    SITE_SETUP = 4102
    SITE_POLICY = 4103
    INTERNAL = 4199


#: The only text that accompanies each code.
SITE_ERROR_MESSAGES: dict[SiteErrorCode, str] = {
    SiteErrorCode.RUN_CONFIG: "fedsafe site error 4101: the site could not read the run config",
    SiteErrorCode.SITE_SETUP: (
        "fedsafe site error 4102: the site could not load its data, schema or ledger; "
        "details are in the site's log"
    ),
    SiteErrorCode.SITE_POLICY: (
        "fedsafe site error 4103: the site's policy file is missing or invalid; "
        "details are in the site's log"
    ),
    SiteErrorCode.INTERNAL: (
        "fedsafe site error 4199: the site failed; details are in the site's log"
    ),
}


class RunConfigRejected(UserError):
    """The run config the coordinator sent cannot be read (reported as a code only)."""


def code_of(exc: BaseException) -> SiteErrorCode:
    """The code an exception is reported under."""
    from fedsafe.client.policy import PolicyError

    if isinstance(exc, RunConfigRejected):
        return SiteErrorCode.RUN_CONFIG
    if isinstance(exc, PolicyError):
        return SiteErrorCode.SITE_POLICY
    if isinstance(exc, UserError | OSError | ValueError | KeyError):
        return SiteErrorCode.SITE_SETUP
    return SiteErrorCode.INTERNAL


def error_reply(msg: Message, code: SiteErrorCode) -> Message:
    """The reply for an error: the code and its fixed sentence."""
    return Message(Error(code=int(code), reason=SITE_ERROR_MESSAGES[code]), reply_to=msg)


def errors_as_codes(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost ClientApp mod: every exception becomes a code; details stay in the site's log."""
    try:
        return call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - every error, by design
        code = code_of(exc)
        log.error(
            "fedsafe: %s handler failed (sent the coordinator only code %d)",
            msg.metadata.message_type,
            int(code),
            exc_info=exc,
        )
        return error_reply(msg, code)
