"""Flower apps for the task, for ``flwr run .`` (see pyproject.toml): fedsafe's, with our task."""

from __future__ import annotations

import fedsafe
from own_model.task import task

client = fedsafe.client_app(task)
server = fedsafe.server_app(task)
