"""``--task package.module:attr``: a :class:`~fedsafe.Task` chosen on the command line.

Shared by ``fedsafe simulate`` (the researcher's task for every simulated site), ``fedsafe site
start`` (the site's own task) and ``fedsafe run`` (the model the coordinator builds). The task's
defaults (batch size, local steps, learning rate, clipping norm) fill every setting no flag
gives; for CSV + schema sites they are scaled to the smallest site's declared public size and
printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from fedsafe.config import RunConfig

if TYPE_CHECKING:
    from fedsafe.data.site_data import SiteData
    from fedsafe.tasks.task import Task

# fedsafe.tasks.task and fedsafe.data.site_data import torch (seconds): they are imported where
# used, so building the CLI's parser (which reads TASK_HELP) does not pay for them (issue 17).

TASK_HELP = (
    "your own task, package.module:attr naming a fedsafe.Task (the module must import from "
    "the current folder or PYTHONPATH; see docs/tasks.md)"
)

#: Flags a task's defaults fill when not given, and their run-config keys.
DEFAULT_FLAGS = {
    "batch_size": "batch-size",
    "local_steps": "local-steps",
    "client_lr": "client-lr",
    "max_grad_norm": "max-grad-norm",
}


def import_task(path: str) -> Task:
    """Import the task at ``path``, with the current folder on the path (as ``flwr run`` does).

    Raises
    ------
    UserError
        One line naming the flag, the path and the fix.
    """
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    from fedsafe.tasks.task import load_task

    return load_task(path)


def simulated_task_sites(
    cfg: RunConfig, task: Task, site_paths: tuple[tuple[str, str], ...]
) -> tuple[SiteData, ...]:
    """Every simulated site's data, loaded here before Flower starts (each problem up front)."""
    from fedsafe.tasks.task import SiteRef, load_task_site

    options = {
        k: v
        for k, v in cfg.to_mapping().items()
        if k in ("lending-sites", "mnist-sites", "mnist-alpha", "seed")
    }
    count = len(site_paths) or cfg.min_sites or task.num_sites
    sites = []
    for i in range(count):
        name, path = site_paths[i] if site_paths else ("", "")
        ref = SiteRef(i, count, name, path, cfg.schema_path, options)
        data = load_task_site(task, ref, f"--task {cfg.task}")
        sites.append(data)
    return tuple(sites)


def with_task_defaults(
    cfg: RunConfig, args: argparse.Namespace, task: Task, public_sizes: list[int]
) -> RunConfig:
    """``cfg`` with the task's defaults for every setting no flag gave; printed in one line."""
    defaults = task.defaults_for(min(public_sizes))
    values: dict[str, Any] = cfg.to_mapping()
    given = {key for flag, key in DEFAULT_FLAGS.items() if getattr(args, flag, None) is not None}
    values.update({k: v for k, v in defaults.to_run_config().items() if k not in given})
    scaled = f" for public size {min(public_sizes)}" if task.scaled_defaults is not None else ""
    override = f" (flags override {', '.join(sorted(given))})" if given else ""
    print(
        f"fedsafe: task {task.name} defaults{scaled}: {defaults.describe()}{override}", flush=True
    )
    return RunConfig.from_mapping(values)


def task_root(path: str) -> str:
    """The folder from which the top-level module of task ``path`` imports ("" = installed).

    Raises
    ------
    UserError
        If the task does not import or is not a Task.
    """
    import importlib.util
    from pathlib import Path

    import_task(path)
    top = path.split(":")[0].split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        return ""
    origin = Path(spec.origin).resolve()
    root = origin.parent.parent if spec.submodule_search_locations else origin.parent
    return "" if "site-packages" in root.parts else str(root)


def site_task_records(path: str, name: str, data: Any, schema: Any) -> int:
    """The number of training records the site's own task loads from its files (checked here).

    Raises
    ------
    UserError
        If the task does not import, or its ``load`` fails or returns no SiteData.
    """
    from fedsafe.data.site_data import SiteData
    from fedsafe.errors import UserError
    from fedsafe.tasks.task import SiteRef

    task = import_task(path)
    try:
        loaded = task.load(SiteRef(name=name, data_path=str(data), schema_path=str(schema)))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the site's own load(): one line, then exit 2
        raise UserError(
            f"--task {path}: load() failed on --data {data} ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(loaded, SiteData):
        raise UserError(f"--task {path}: load() returned a {type(loaded).__name__}, not SiteData")
    return len(loaded.x_train)


def check_task_model(task: Task, num_features: int, seed: int) -> None:
    """Build the task's model once before Flower starts, saying any fix in one line.

    A model DP-SGD cannot train is refused here (exit code 2) rather than at every site.
    """
    from fedsafe.tasks.task import checked_task_model

    checked = checked_task_model(task, num_features, seed)
    if checked.note:
        print(f"fedsafe: {checked.note}", flush=True)


#: The least training records of a deployed site's default policy (``fedsafe site init``).
TINY_SITE = 50


def warn_tiny_sites(sites: tuple[SiteData, ...] | list[SiteData]) -> list[str]:
    """Warn (one line each) about simulated sites a deployed site's default policy refuses.

    In simulation the researcher owns every site, so a tiny one is warned about, not refused;
    deployed, ``min-records`` (default :data:`TINY_SITE`) refuses it.

    Returns
    -------
    list of str
        The names of the tiny sites.
    """
    tiny = [s.name for s in sites if len(s.x_train) < TINY_SITE]
    for name in tiny:
        print(
            f"fedsafe: warning: site {name} has fewer than {TINY_SITE} training records: DP "
            "noise will swamp its update, and a deployed site's default policy refuses it "
            f"(min-records {TINY_SITE})",
            flush=True,
        )
    return tiny
