"""fedsafe: federated learning with per-site differential privacy on Flower and Opacus.

The public API for your own data and model (docs/tasks.md):

- :class:`Task`, :class:`TaskDefaults`, :class:`SiteRef`, :class:`SiteData`: what a site trains;
- :func:`client_app` and :func:`server_app`: Flower apps for a task, to compose your own app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["SiteData", "SiteRef", "Task", "TaskDefaults", "client_app", "server_app"]

if TYPE_CHECKING:
    from fedsafe.data.site_data import SiteData
    from fedsafe.tasks.task import SiteRef, Task, TaskDefaults


def __getattr__(name: str) -> Any:
    # Lazy: ``import fedsafe`` stays light (the CLI and the Flower app import sub-modules).
    if name in ("Task", "TaskDefaults", "SiteRef"):
        from fedsafe.tasks import task

        return getattr(task, name)
    if name == "SiteData":
        from fedsafe.data.site_data import SiteData

        return SiteData
    if name in ("client_app", "server_app"):
        from fedsafe import flower_apps

        return getattr(flower_apps, name)
    raise AttributeError(f"module 'fedsafe' has no attribute {name!r}")
