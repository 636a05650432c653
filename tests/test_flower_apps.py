"""``fedsafe.client_app(task)`` / ``fedsafe.server_app(task)``: Flower apps for a user's task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

import fedsafe
from fedsafe.client import site as site_module
from fedsafe.tasks.task import SiteRef, build_task_model


def _load(site: SiteRef) -> fedsafe.SiteData:
    rng = np.random.default_rng(site.index)  # synthetic test data, not privacy
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return fedsafe.SiteData(f"own-{site.index}", x[:90], y[:90], x[90:], y[90:], ("a",) * 4)


TASK = fedsafe.Task(
    "three-class",
    _load,
    lambda n, g: torch.nn.Linear(n, 3),
    metrics=("loss", "accuracy"),
    defaults=fedsafe.TaskDefaults(batch_size=8, local_steps=2),
)


@pytest.fixture(autouse=True)
def fresh_binding(monkeypatch):
    """Each test binds its own task; the process-wide binding is restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(site_module, "_APP_TASK", [])
    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_client_app_trains_the_given_task_at_a_simulated_site() -> None:
    app = fedsafe.client_app(TASK)
    assert isinstance(app, ClientApp)
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    content["arrays"] = ArrayRecord(build_task_model(TASK, 4, 42).state_dict())
    msg = Message(content, dst_node_id=3, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    context = Context(
        run_id=11, node_id=3, node_config={"partition-id": 1, "num-partitions": 2},
        state=RecordDict(), run_config={"local-steps": 2, "batch-size": 8, "ledger-dir": ""},
    )  # fmt: skip
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    assert reply.content.config_records["site"]["site-name"] == "own-1"
    assert reply.content.metric_records["metrics"]["steps"] == 2
    weights = reply.content.array_records["arrays"].to_torch_state_dict()["weight"]
    assert weights.shape == (3, 4)  # the task's three-class model, not fedsafe's logreg


def test_server_app_is_a_flower_server_app_and_both_refuse_a_non_task() -> None:
    assert isinstance(fedsafe.server_app(TASK), ServerApp)
    with pytest.raises(TypeError, match="fedsafe.Task"):
        fedsafe.client_app("mytask:task")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fedsafe.Task"):
        fedsafe.server_app(object())  # type: ignore[arg-type]
