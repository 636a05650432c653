"""The task a run trains: the run config's ``task`` path, else its scenario's shipped task.

One place decides, for the simulated sites, the coordinator and the CLI: ``task =
"package.module:attr"`` imports a user's :class:`~fedsafe.tasks.task.Task`; scenario
``custom`` is the CSV + schema task of the run's ``schema-path``; ``heart``, ``lending`` and
``mnist`` are the shipped tasks.
"""

from __future__ import annotations

from fedsafe.config import RunConfig
from fedsafe.tasks.task import Task, load_task


def run_task(cfg: RunConfig) -> Task:
    """The task the run config asks for.

    Raises
    ------
    UserError
        If the task path does not import or is not a Task, or the schema is invalid.
    """
    if cfg.task:
        return load_task(cfg.task)
    if cfg.scenario == "custom":
        from fedsafe.tasks.csv_task import csv_task

        return csv_task(cfg.schema_path)
    from fedsafe.tasks.shipped import shipped_task

    return shipped_task(cfg.scenario)
