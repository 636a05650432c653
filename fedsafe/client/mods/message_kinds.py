"""Which handler a message goes to: its category, with or without a Flower action suffix."""

from __future__ import annotations

from flwr.app import Message, MessageType


def category(msg: Message) -> str:
    """``train``, ``evaluate``, ``query`` or ``system`` for ``train`` or ``train.<action>``."""
    return msg.metadata.message_type.split(".", 1)[0]


def is_train(msg: Message) -> bool:
    """Whether ``msg`` goes to a train handler (any action)."""
    return category(msg) == MessageType.TRAIN


def is_train_or_evaluate(msg: Message) -> bool:
    """Whether ``msg`` goes to a handler that touches the site's records."""
    return category(msg) in (MessageType.TRAIN, MessageType.EVALUATE)
