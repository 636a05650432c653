"""A user's own strategy, loaded by class path in the tests (``tests.server.user_strategy:...``)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg


class ElementwiseMax(FedAvg):
    """Takes the element-wise maximum of the sites' models (easy to tell from an average)."""

    def __init__(self, min_train_nodes: int = 2, min_available_nodes: int = 2) -> None:
        super().__init__(
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_available_nodes,
            min_available_nodes=min_available_nodes,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        models = [m.content.array_records["arrays"] for m in replies]
        out = {
            key: Array(np.max(np.stack([m[key].numpy() for m in models]), axis=0))
            for key in models[0].keys()
        }
        return ArrayRecord(out), MetricRecord({"sites-maxed": len(models)})


class NotAStrategy:
    """Something that is not a Flower strategy."""
