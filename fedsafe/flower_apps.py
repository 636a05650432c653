"""Flower apps for a :class:`~fedsafe.Task`, for Flower users who compose their own app.

``fedsafe.client_app(task)`` is fedsafe's ClientApp (the site's policy, DP-SGD with secret
noise, the ledger, the release check: :mod:`fedsafe.client.app`) training ``task``;
``fedsafe.server_app(task)`` is fedsafe's ServerApp (:mod:`fedsafe.server.app`) building the
initial model from ``task``. Name them in your ``pyproject.toml``::

    [tool.flwr.app.components]
    serverapp = "mytask:server"     # server = fedsafe.server_app(task)
    clientapp = "mytask:client"     # client = fedsafe.client_app(task)

The run config is fedsafe's (:data:`fedsafe.config.DEFAULT_RUN_CONFIG`); set ``min-sites``
to your number of sites. This module sits at the top of fedsafe's layers, beside the CLI.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsafe.tasks.task import Task


def client_app(task: Task) -> ClientApp:
    """Fedsafe's ClientApp, training ``task`` at this site.

    The task is the site's choice: a run whose config names another ``task`` path is
    refused by a deployed site (typed refusal, setting ``task``); nothing else leaves.

    Raises
    ------
    TypeError
        If ``task`` is not a :class:`~fedsafe.Task`.
    """
    if not isinstance(task, Task):
        raise TypeError(f"client_app needs a fedsafe.Task, got {type(task).__name__}")
    from fedsafe.client import app as client_module
    from fedsafe.client.site import bind_app_task

    bind_app_task(task)
    return client_module.app


def server_app(task: Task | None = None) -> ServerApp:
    """Fedsafe's ServerApp; with ``task``, the initial model is ``task``'s.

    Raises
    ------
    TypeError
        If ``task`` is given and is not a :class:`~fedsafe.Task`.
    """
    if task is not None and not isinstance(task, Task):
        raise TypeError(f"server_app needs a fedsafe.Task, got {type(task).__name__}")
    from fedsafe.server.app import coordinate

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        coordinate(grid, context, task)

    return app
