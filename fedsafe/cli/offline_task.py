"""What ``fedsafe privacy audit`` and ``fedsafe baseline`` train on: a scenario, a task, CSVs.

Both commands run where their user holds the records (no coordinator, no site process), so
they load the sites here, from one of:

- ``--scenario heart|lending|mnist``: a shipped scenario (the default, ``heart``);
- ``--task package.module:attr``: the user's :class:`~fedsafe.Task`, its sites loaded as a
  simulation loads them (``load(SiteRef(i, num_sites))``), or, with ``--site NAME=data.csv``,
  as a deployed site loads its own file (``load(SiteRef(name=..., data_path=...))``);
- ``--site NAME=data.csv --schema s.yaml`` without ``--task``: the CSV + schema task.

The model is the task's, built from the run's seed and checked for DP-SGD once here: a
BatchNorm model is fixed to GroupNorm (said in one line) for every model the command trains,
so an audit's DP and non-DP arms, and the baselines, train the architecture a federated run
of the task trains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fedsafe.data.site_data import SiteData
from fedsafe.errors import UserError
from fedsafe.tasks.task import LossFn, SiteRef, Task, TaskDefaults, load_task_site

#: ``--scenario`` when neither it, ``--task`` nor ``--schema`` is given.
DEFAULT_SCENARIO = "heart"


@dataclass(frozen=True, slots=True)
class OfflineTask:
    """The sites, model and scoring a command trains on, loaded where the records are.

    Parameters
    ----------
    label
        What it is, for outputs (``scenario heart``, ``task mytask:task``, ``own data (s.yaml)``).
    record
        What ``audit.json`` records about it (``{"scenario": ...}`` or ``{"task": ...}``).
    sites
        Every loaded site's train and test split (at least one; the same input width).
    model_factory
        Builds a fresh, DP-checked model with the seeded public initial weights.
    headline
        The headline metric (a built-in metric name of :func:`fedsafe.training.loop.evaluate`).
    loss
        The task's per-record loss (``None``: fedsafe's default by output width).
    task
        The task (``None`` for a shipped scenario, whose commands keep their own defaults).
    """

    label: str
    record: dict[str, str]
    sites: tuple[SiteData, ...]
    model_factory: Callable[[], nn.Module] = field(repr=False)
    headline: str
    loss: LossFn | None = field(default=None, repr=False)
    task: Task | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError(f"{self.label}: no sites")
        widths = {s.num_features for s in self.sites}
        if len(widths) != 1:
            shown = ", ".join(f"{s.name} {s.num_features}" for s in self.sites)
            raise UserError(
                f"{self.label}: the sites' records differ in width ({shown} values); one model "
                "needs the same inputs at every site"
            )

    def site(self, name: str | None, flag: str = "--site") -> SiteData:
        """The site named ``name`` (``None``: the one with the most training records).

        Raises
        ------
        UserError
            If there is no such site (naming ``flag`` and the sites there are).
        """
        if name is None:
            return max(self.sites, key=lambda s: len(s.x_train))
        for site in self.sites:
            if site.name == name:
                return site
        names = ", ".join(s.name for s in self.sites)
        raise UserError(f"{flag} {name!r} is not a site of {self.label}; its sites: {names}")

    def defaults(self, site: SiteData) -> TaskDefaults | None:
        """The task's defaults for ``site``'s declared public size (``None`` for a scenario)."""
        if self.task is None:
            return None
        from fedsafe.client.policy import public_size_of

        return self.task.defaults_for(public_size_of(len(site.x_train)))


def split_site_flag(value: str) -> tuple[str, str]:
    """``NAME`` or ``NAME=data.csv`` as (name, absolute path or "").

    Raises
    ------
    UserError
        If the name or the path is empty.
    """
    name, sep, path = value.partition("=")
    if not name.strip() or (sep and not path.strip()):
        raise UserError(f"--site {value!r}: write --site NAME or --site NAME=path/to/data.csv")
    return name.strip(), str(Path(path.strip()).resolve()) if sep else ""


def offline_task(
    *,
    scenario: str | None,
    task_path: str | None,
    site_flags: Sequence[str],
    schema: str | None,
    seed: int,
    num_sites: int | None = None,
    say: Callable[[str], None] = print,
) -> OfflineTask:
    """Load what a command trains on from its ``--scenario/--task/--site/--schema`` flags.

    Parameters
    ----------
    scenario
        ``--scenario`` as given (``None`` when not given).
    task_path
        ``--task package.module:attr`` (``None``: no task).
    site_flags
        The ``--site`` values: ``NAME=data.csv`` ones are loaded (each by the task's ``load``,
        as a deployed site loads its file); ``NAME`` ones only choose among loaded sites and
        are the caller's to look up.
    schema
        ``--schema``: the CSV + schema task without ``--task``; passed to the task's ``load``
        with it.
    seed
        The run's seed: the public initial weights.
    num_sites
        ``--sites``: how many sites the task's ``load`` partitions (default: its
        ``num_sites``), or the lending (4) or mnist (10) scenario's; refused elsewhere.
    say
        Where the model check's one-line note goes.

    Raises
    ------
    UserError
        One line naming the flag and the fix: both ``--scenario`` and ``--task``, a path
        that does not import, a site file without ``--schema`` or ``--task``, a ``load`` that
        fails, or a model DP-SGD cannot train.
    """
    files = [pair for pair in map(split_site_flag, site_flags) if pair[1]]
    names = [n for n, _ in files]
    if len(set(names)) != len(names):
        raise UserError(f"--site: site names must differ, got {', '.join(names)}")
    if scenario is not None and (task_path or schema or files):
        raise UserError(
            f"--scenario {scenario} chooses a shipped scenario: drop it, or drop --task, "
            "--schema and --site NAME=data.csv"
        )
    if files and not (task_path or schema):
        raise UserError("--site NAME=data.csv needs --schema schema.yaml or --task")
    if schema and not (files or task_path):
        raise UserError("--schema needs at least one --site NAME=data.csv")
    partitioned = bool(task_path) or (not schema and scenario in ("lending", "mnist"))
    if num_sites is not None and (files or not partitioned):
        raise UserError(
            "--sites counts the sites a --task (or the lending or mnist scenario) splits its "
            "records into; drop it (site files and heart have their own sites)"
        )
    if num_sites is not None and num_sites < 1:
        raise UserError(f"--sites must be >= 1, got {num_sites}")
    if not (task_path or schema):
        return _scenario(scenario or DEFAULT_SCENARIO, seed, num_sites)

    schema_path = str(Path(schema).resolve()) if schema else ""
    if task_path:
        from fedsafe.cli.task_options import import_task

        task, label, record = import_task(task_path), f"task {task_path}", {"task": task_path}
    else:
        from fedsafe.tasks.csv_task import csv_task

        task = csv_task(schema_path)
        label, record = f"own data ({schema})", {"task": "csv", "schema": schema_path}
    flag = f"--task {task_path}" if task_path else f"--schema {schema}"
    count = num_sites or task.num_sites
    # The public options a shipped task reads, as a simulation passes them.
    options = {"seed": seed, "lending-sites": count, "mnist-sites": count}
    refs = (
        [SiteRef(name=n, data_path=p, schema_path=schema_path) for n, p in files]
        if files
        else [SiteRef(i, count, schema_path=schema_path, options=options) for i in range(count)]
    )
    sites = tuple(load_task_site(task, ref, flag) for ref in refs)
    factory = task_model_factory(task, sites[0].num_features, seed, say)
    return OfflineTask(label, record, sites, factory, task.headline, task.loss, task)


def task_model_factory(
    task: Task, num_features: int, seed: int, say: Callable[[str], None] = print
) -> Callable[[], nn.Module]:
    """A factory of the task's checked model: built once here (failing early), the fix said once.

    Raises
    ------
    UserError
        If the factory fails or the model cannot be trained with DP-SGD.
    """
    from fedsafe.tasks.task import checked_task_model

    checked = checked_task_model(task, num_features, seed)
    if checked.note:
        say(f"fedsafe: {checked.note}")
    return lambda: checked_task_model(task, num_features, seed).model


def _scenario(name: str, seed: int, num_sites: int | None) -> OfflineTask:
    from functools import partial

    from fedsafe.models import build_model
    from fedsafe.tasks.scenarios import load_scenario

    scenario = load_scenario(name, num_sites or 4, num_sites or 10)
    factory = partial(build_model, scenario.model, scenario.num_features, seed)
    return OfflineTask(
        f"scenario {name}", {"scenario": name}, scenario.sites, factory, scenario.headline_metric
    )
