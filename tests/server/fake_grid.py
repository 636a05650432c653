"""An in-memory stand-in for Flower's grid: each message is answered by a function of it.

The replies are real :class:`flwr.app.Message` objects (``Message(content, reply_to=msg)``),
built either by hand or by calling fedsafe's real ClientApp (:class:`ClientAppSites`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

Answer = Callable[[int, Message], RecordDict | Message]


class FakeGrid:
    """Answers every message with ``answer(node, message)``; records who was asked.

    Replies come back one per pull, so a collector has to go round. Nodes in ``offline`` are
    listed with status ``offline``; nodes in ``silent`` never answer.
    """

    def __init__(self, nodes: list[int], answer: Answer) -> None:
        self.nodes, self.answer = nodes, answer
        self.asked: list[tuple[str, int]] = []
        self.ready: dict[str, Message] = {}
        self.pulls = 0
        self.offline: set[int] = set()
        self.silent: set[int] = set()
        self.sent: list[Message] = []

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [
            NodeInfo(node_id=n, status="offline" if n in self.offline else "online")
            for n in self.nodes
        ]

    def get_node_ids(self) -> Iterable[int]:
        return [n.node_id for n in self.get_nodes()]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as the SuperLink does
            node = m.metadata.dst_node_id
            self.asked.append((m.metadata.message_type, node))
            self.sent.append(m)
            if node not in self.silent:
                got = self.answer(node, m)
                reply = got if isinstance(got, Message) else Message(got, reply_to=m)
                self.ready[m.object_id] = reply
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        wanted = [m for m in message_ids if m in self.ready]
        if not wanted:
            return []
        # In node order, whatever order the strategy sampled, so two runs can be compared.
        first = min(wanted, key=lambda m: self.ready[m].metadata.src_node_id)
        return [self.ready.pop(first)]


class ClientAppSites:
    """Answers with fedsafe's real ClientApp, one persistent :class:`Context` per node."""

    def __init__(self, run_config: dict[str, object], partitions: dict[int, int]) -> None:
        from fedsafe.client.app import app

        self.app = app
        self.contexts = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={"partition-id": part, "num-partitions": len(partitions)},
                state=RecordDict(),
                run_config=dict(run_config),  # type: ignore[arg-type]
            )
            for node, part in partitions.items()
        }

    def __call__(self, node: int, msg: Message) -> Message:
        return self.app(msg, self.contexts[node])
