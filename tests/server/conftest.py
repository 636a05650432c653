"""Fixtures for the coordinator's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process has: its run, node and task ids (messages are stamped with them)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
