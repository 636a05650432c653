"""The evaluate-first mod: the received model is measured before training, only when asked."""

from __future__ import annotations

import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedsafe.client.evaluate_first import evaluate_first
from fedsafe.models import build_model
from fedsafe.protocol import EVALUATE_FIRST, EVALUATION_RECORD
from fedsafe.tasks.scenarios import load_scenario


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _context() -> Context:
    return Context(
        7, 1, {"partition-id": 0, "num-partitions": 4}, RecordDict(), {"scenario": "heart"}
    )


def _train_message(ask: bool, zero: bool = False) -> Message:
    site = load_scenario("heart").site(0)
    model = build_model("logreg", site.num_features, 42)
    state = model.state_dict()
    if zero:
        state = {k: v * 0 for k, v in state.items()}
    config = ConfigRecord({"server-round": 1, **({EVALUATE_FIRST: True} if ask else {})})
    msg = Message(
        RecordDict({"arrays": ArrayRecord(state), "config": config}), 1, MessageType.TRAIN
    )
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _trained(msg: Message, context: Context) -> Message:
    """A stand-in train handler that replaces the model, as training would."""
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=msg)


def test_the_received_model_is_evaluated_when_asked():
    reply = evaluate_first(_train_message(ask=True, zero=True), _context(), _trained)
    evaluation = reply.content.metric_records[EVALUATION_RECORD]
    assert "num-test-examples" not in evaluation  # no exact count leaves
    # A zero model predicts 0.5 everywhere: log-loss ln 2 whatever the labels.
    assert evaluation["eval-loss"] == pytest.approx(0.6931, abs=1e-3)
    assert set(evaluation) <= {"eval-loss", "eval-accuracy", "eval-roc-auc", "eval-pr-auc"}
    assert reply.content.metric_records["metrics"]["num-examples"] == 3  # the handler's reply


def test_a_refusal_gets_no_evaluation():
    def refused(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"refused": 1})}), reply_to=msg)

    reply = evaluate_first(_train_message(ask=True), _context(), refused)
    assert list(reply.content.metric_records) == ["metrics"]


def test_nothing_is_added_unless_asked():
    reply = evaluate_first(_train_message(ask=False), _context(), _trained)
    assert EVALUATION_RECORD not in reply.content.metric_records


def test_an_error_reply_is_passed_on_unchanged():
    def failing(msg: Message, context: Context) -> Message:
        return Message(Error(code=1, reason="no"), reply_to=msg)

    reply = evaluate_first(_train_message(ask=True), _context(), failing)
    assert reply.has_error() and reply.error.reason == "no"
