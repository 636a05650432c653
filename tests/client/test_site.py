"""A site's task: chosen by the deployed site (node config), refused when a run asks another.

The real ClientApp is called as a SuperNode calls it, with a real CSV, schema, policy file,
SQLite ledger and a task module written to a temporary folder (outside the package).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedsafe.client.app import app
from fedsafe.client.policy import SitePolicy
from fedsafe.privacy.releases import DECLARED_METRIC_KEYS
from fedsafe.tasks.task import SiteRef, build_task_model, load_task

TASK_MODULE = """
import torch
from torch import nn
from fedsafe import Task, TaskDefaults
from fedsafe.data.schema import prepare_site

CALLS = []

def load(site):
    return prepare_site(site.name, site.data_path, site.schema_path).data

def model(num_features, generator):
    # BatchNorm: fedsafe replaces it (GroupNorm) for DP-SGD, at the site and the coordinator.
    return nn.Sequential(nn.Linear(num_features, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

def loss(logits, y):
    CALLS.append(len(y))
    return nn.functional.binary_cross_entropy_with_logits(
        logits.reshape(-1), y.float(), reduction="none")

task = Task("site-own", load, model, loss=loss, metrics=("loss", "roc-auc"),
            headline="roc-auc", defaults=TaskDefaults(batch_size=8, local_steps=3))
"""

SCHEMA = """label: {column: outcome, positive: yes, negative: no}
drop: [patient_id]
features:
  age: {type: numeric, range: [18, 100], source: "years, adult patients"}
"""


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ClientApp process has: its run, node and task ids (replies are stamped)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 11), ("_node_id", 3), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def site(tmp_path: Path, monkeypatch) -> dict[str, Any]:
    (tmp_path / "site_own_task.py").write_text(textwrap.dedent(TASK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("site_own_task", None)
    rows = ["patient_id,age,outcome"] + [
        f"{i},{20 + i % 60},{'yes' if (i * 7) % 10 < 4 + (i % 60) // 20 else 'no'}"
        for i in range(160)
    ]
    (tmp_path / "site.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    policy = SitePolicy.for_records(
        160, public_size=90, min_records=20, max_rounds=5, max_local_steps=20
    )
    (tmp_path / "policy.toml").write_text(policy.to_toml())
    return {
        "site-name": "hospital-a",
        "data-path": str(tmp_path / "site.csv"),
        "schema-path": str(tmp_path / "schema.yaml"),
        "ledger-path": str(tmp_path / "ledger.sqlite"),
        "policy-path": str(tmp_path / "policy.toml"),
        "device": "cpu",
        "task": "site_own_task:task",
    }


def _message(kind: str, width: int) -> Message:
    task = load_task("site_own_task:task")
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    content["arrays"] = ArrayRecord(build_task_model(task, width, 42).state_dict())
    msg = Message(content, dst_node_id=3, message_type=kind)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does
    return msg


def _context(node_config: dict[str, Any], run_config: dict[str, Any]) -> Context:
    return Context(
        run_id=11, node_id=3, node_config=node_config, state=RecordDict(), run_config=run_config
    )


RUN = {"scenario": "custom", "local-steps": 3, "batch-size": 8, "num-server-rounds": 2}


def test_a_deployed_site_trains_its_own_task_with_its_loss_and_metrics(site) -> None:
    run = {**RUN, "task": "site_own_task:task"}
    reply = app(_message(MessageType.TRAIN, 1), _context(site, run))
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 90 and metrics["steps"] == 3
    assert set(metrics) <= DECLARED_METRIC_KEYS
    assert sys.modules["site_own_task"].CALLS, "the task's loss trained the model"
    evaluation = app(_message(MessageType.EVALUATE, 1), _context(site, run))
    assert not evaluation.has_error(), evaluation.error
    # Exactly the task's declared metrics: no accuracy, no PR AUC.
    assert set(evaluation.content.metric_records["metrics"]) == {"eval-loss", "eval-roc-auc"}


@pytest.mark.parametrize("asked", ["fedsafe.tasks.heart:task", ""])
def test_a_run_asking_for_another_task_is_refused_and_nothing_else_leaves(site, asked) -> None:
    if not asked:
        site = {k: v for k, v in site.items() if k != "task"}  # a CSV site asked for a task
        asked = "site_own_task:task"
    ledger = Path(site["ledger-path"])
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = app(_message(kind, 1), _context(site, {**RUN, "task": asked}))
        assert not reply.has_error(), reply.error
        assert {n: set(r) for n, r in reply.content.items()} == {
            "metrics": {"refused"},
            "site": {"site-name", "refused-setting", "refusal-reason"},
        }
        assert reply.content.config_records["site"]["refused-setting"] == "task"
    assert not ledger.exists()


def test_a_simulated_site_trains_the_task_the_run_config_names(tmp_path) -> None:
    from fedsafe.tasks.heart import task as heart

    node = {"partition-id": 2, "num-partitions": 4}
    run = {"task": "fedsafe.tasks.heart:task", "local-steps": 2, "ledger-dir": str(tmp_path)}
    width = heart.load(SiteRef(2, 4)).num_features
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    content["arrays"] = ArrayRecord(build_task_model(heart, width, 42).state_dict())
    msg = Message(content, dst_node_id=3, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    reply = app(msg, _context(node, run))
    assert not reply.has_error(), reply.error
    assert reply.content.config_records["site"]["site-name"] == heart.load(SiteRef(2, 4)).name
    assert reply.content.metric_records["metrics"]["epsilon"] > 0  # DP, recorded in its ledger
    assert list(tmp_path.iterdir())


def test_simulated_task_sites_get_their_csv_paths(tmp_path, site) -> None:
    from fedsafe.cli.task_options import simulated_task_sites
    from fedsafe.config import RunConfig

    task = load_task("site_own_task:task")
    paths = (("a", site["data-path"]), ("b", site["data-path"]))
    cfg = RunConfig.from_mapping({"task": "site_own_task:task", "schema-path": site["schema-path"]})
    sites = simulated_task_sites(cfg, task, paths)
    assert [s.name for s in sites] == ["a", "b"]


def test_initial_model_is_a_new_copy_of_the_seeded_build_each_call() -> None:
    """fedsafe's models are built once per process and copied: the same weights as a fresh
    build, never the same module (training one leaves the next untouched)."""
    import torch

    from fedsafe.client.site import SiteSetup, initial_model
    from fedsafe.models import build_model
    from fedsafe.tasks.scenarios import load_scenario

    data = load_scenario("heart").site(1)
    site = SiteSetup(
        data=data, model="mlp", device="cpu", ledger_path="", fingerprint="fp",
        public_size=100, budget=None, policy=None,
    )  # fmt: skip
    fresh = build_model("mlp", data.num_features, 7).state_dict()
    first = initial_model(site, 7)
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)  # as training does, in place
    second = initial_model(site, 7)
    assert second is not first
    for name, value in second.state_dict().items():
        assert torch.equal(value, fresh[name]), name
    other_seed = initial_model(site, 8).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in other_seed.items())
