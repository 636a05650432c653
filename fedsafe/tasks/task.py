"""The public task API: what a site trains, as one small immutable value (``fedsafe.Task``).

A task says how a site loads its train and test records, which model is trained on them (a
factory taking a seeded generator), the loss, the metrics it reports (by declared name) with
its headline metric, and its default training settings. It is code that touches a site's
records: at a deployed site the *site* chooses it (``fedsafe site start --task
package.module:attr``); in simulation, where one researcher owns both sides, ``fedsafe
simulate --task package.module:attr`` or ``task = "package.module:attr"`` in the run config
chooses it.

The anchors: Flower apps define a ``task.py`` (model, data, train, test); FLamby (du Terrail
et al., NeurIPS 2022 Datasets and Benchmarks) ships each data set as center-indexed data with
its baseline model, loss and metric. A fedsafe task adds nothing to train with: DP-SGD
(Abadi et al., CCS 2016), the noise, the accounting and the release check stay the site's.

Minimal example (a module ``mytask.py`` on the path)::

    import torch
    from fedsafe import SiteData, Task

    def load(site):                       # site: fedsafe.tasks.task.SiteRef
        x, y = my_records(site.name)      # numpy float32 (n, ...) and labels (n,)
        return SiteData(site.name, x[:800], y[:800], x[800:], y[800:], ("f1", "f2"))

    def model(num_features, generator):   # the initial model is public: a seeded generator
        return torch.nn.Linear(num_features, 1)

    task = Task("my-task", load, model, metrics=("loss", "accuracy", "roc-auc"),
                headline="roc-auc")
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedsafe.config import MAX_MAX_GRAD_NORM, MIN_MAX_GRAD_NORM
from fedsafe.data.site_data import SiteData
from fedsafe.errors import UserError

if TYPE_CHECKING:
    from fedsafe.training.model_check import CheckedModel

#: Metrics a task may report: the test-split figures every site's release check declares
#: (:mod:`fedsafe.privacy.releases`, as ``eval-<name>``) and the reports show.
METRIC_NAMES = ("loss", "accuracy", "roc-auc", "pr-auc")

#: ``package.module:attr``
TASK_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")

#: A loss: logits ``(batch, outputs)`` and labels ``(batch,)`` -> per-record losses ``(batch,)``.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: A model factory: input width and a seeded generator -> a fresh module.
ModelFactory = Callable[[int, torch.Generator], nn.Module]


def default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-record loss: binary cross-entropy on one logit, else cross-entropy over classes.

    Parameters
    ----------
    logits
        Shape ``(batch, 1)`` (binary, labels 0/1) or ``(batch, classes)`` (labels 0..K-1).
    y
        Labels, shape ``(batch,)``.

    Returns
    -------
    torch.Tensor
        Shape ``(batch,)``; the training loop takes its mean.
    """
    if logits.shape[-1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(
            logits.reshape(-1), y.float(), reduction="none"
        )
    return nn.functional.cross_entropy(logits, y.long(), reduction="none")


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    """A task's default training settings; a run's flags and run config override them.

    Parameters
    ----------
    batch_size
        Expected Poisson batch size (records).
    local_steps
        DP-SGD steps per round.
    lr
        Client learning rate (SGD).
    max_grad_norm
        Per-record clipping norm, in ``[1e-6, 1e6]`` (float32 clipping, see
        :data:`fedsafe.config.MIN_MAX_GRAD_NORM`).

    Raises
    ------
    ValueError
        If a value is out of range.
    """

    batch_size: int = 4
    local_steps: int = 10
    lr: float = 0.1
    max_grad_norm: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.local_steps < 1:
            raise ValueError("task defaults: batch_size and local_steps must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"task defaults: lr must be > 0, got {self.lr}")
        if not MIN_MAX_GRAD_NORM <= self.max_grad_norm <= MAX_MAX_GRAD_NORM:
            raise ValueError(
                f"task defaults: max_grad_norm must be in [{MIN_MAX_GRAD_NORM:g}, "
                f"{MAX_MAX_GRAD_NORM:g}], got {self.max_grad_norm}"
            )

    def to_run_config(self) -> dict[str, Any]:
        """The run-config keys these defaults set."""
        return {
            "batch-size": self.batch_size,
            "local-steps": self.local_steps,
            "client-lr": self.lr,
            "max-grad-norm": self.max_grad_norm,
        }

    def describe(self) -> str:
        """One line, as ``fedsafe simulate`` prints it."""
        return (
            f"batch {self.batch_size}, {self.local_steps} local steps, lr {self.lr:g}, "
            f"clip {self.max_grad_norm:g}"
        )


@dataclass(frozen=True, slots=True)
class SiteRef:
    """Which site a task loads: what the site's own node config (or the simulation) says.

    Parameters
    ----------
    index
        The simulated site's partition (0-based); -1 at a deployed site.
    num_sites
        How many simulated sites there are; 0 at a deployed site.
    name
        The site's name ("" when the task names its sites itself).
    data_path, schema_path
        The site's data file and schema ("" when the task finds its data itself).
    options
        Public run-config values a shipped task reads (``lending-sites``, ``mnist-alpha``).
    """

    index: int = -1
    num_sites: int = 0
    name: str = ""
    data_path: str = ""
    schema_path: str = ""
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        if self.index < -1 or self.num_sites < 0:
            raise ValueError("a site's index is >= 0 (simulated) or -1 (deployed)")
        if self.index >= 0 and self.index >= self.num_sites:
            raise ValueError(
                f"simulated site {self.index} does not exist: the run has {self.num_sites} sites"
            )
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


def _fixed_defaults(defaults: TaskDefaults) -> Callable[[int], TaskDefaults]:
    return lambda _public_size: defaults


@dataclass(frozen=True, slots=True)
class Task:
    """What a site trains: its data, the model, the loss, the metrics and default settings.

    Parameters
    ----------
    name
        Short name shown in outputs and recorded in ``model.json``.
    load
        ``load(site: SiteRef) -> SiteData``: the site's train and test split (numpy arrays,
        one row per record; float32 0/1 labels for one logit, int64 classes otherwise). Use
        :func:`site_data_from_tensors` for tensors or a ``torch.utils.data.Dataset``. Only
        public constants may shape the preprocessing (no statistic of the records).
    model
        ``model(num_features, generator) -> nn.Module``. The generator is seeded with the run's
        seed, and so is torch's global generator while the factory runs, so every site and the
        coordinator build the same initial weights: the initial model is public, so a seeded
        (non-secret) generator is right here; privacy never rests on it. A model Opacus
        cannot train (BatchNorm) is fixed to GroupNorm with a printed note, or refused with
        the fix (:mod:`fedsafe.training.model_check`).
    loss
        Per-record loss ``loss(logits, y) -> (batch,)``; default :func:`default_loss`.
    metrics
        Names of the test-split metrics the sites report, from :data:`METRIC_NAMES`; the
        release check declares exactly these, so an undeclared name is refused here.
    headline
        The metric tables and reports lead with (one of ``metrics``).
    defaults
        Default batch size, local steps, learning rate and clipping norm.
    scaled_defaults
        Optional ``f(public_size) -> TaskDefaults``: defaults scaled to a site's declared
        public size (never its exact count); overrides ``defaults`` when given.
    num_sites
        How many sites a simulation of this task has unless told otherwise.

    Raises
    ------
    UserError
        If a field is invalid (an undeclared metric, a headline not among the metrics).
    """

    name: str
    load: Callable[[SiteRef], SiteData]
    model: ModelFactory
    loss: LossFn = default_loss
    metrics: tuple[str, ...] = ("loss", "accuracy", "roc-auc", "pr-auc")
    headline: str = "accuracy"
    defaults: TaskDefaults = TaskDefaults()
    scaled_defaults: Callable[[int], TaskDefaults] | None = None
    num_sites: int = 2

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][\w.\-]{0,63}", self.name):
            raise UserError(f"Task name {self.name!r}: use 1-64 letters, digits, '.', '-' or '_'")
        for part in ("load", "model", "loss"):
            if not callable(getattr(self, part)):
                raise UserError(f"Task {self.name!r}: {part} must be callable")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        undeclared = [m for m in self.metrics if m not in METRIC_NAMES]
        if undeclared:
            raise UserError(
                f"Task {self.name!r}: metric(s) {', '.join(map(repr, undeclared))} are not "
                f"declared releases; choose from {', '.join(METRIC_NAMES)} (a new metric is a "
                "new release: declare it in fedsafe/privacy/releases.py first)"
            )
        if self.headline not in self.metrics:
            raise UserError(
                f"Task {self.name!r}: headline {self.headline!r} is not one of its metrics "
                f"({', '.join(self.metrics)})"
            )
        if self.num_sites < 1:
            raise UserError(f"Task {self.name!r}: num_sites must be >= 1")

    def defaults_for(self, public_size: int) -> TaskDefaults:
        """The defaults for a site of this declared public size (``scaled_defaults`` or fixed)."""
        if self.scaled_defaults is None:
            return self.defaults
        return self.scaled_defaults(public_size)


def load_task(path: str) -> Task:
    """Import a task named ``package.module:attr``.

    Raises
    ------
    UserError
        If ``path`` is malformed, its module does not import, or ``attr`` is not a
        :class:`Task` (one line, naming the path and the fix).
    """
    if not TASK_PATH.match(path):
        raise UserError(
            f"--task {path!r}: write package.module:attr (e.g. mytask:task, with mytask.py on "
            "the Python path)"
        )
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"--task {path!r}: module {module_name!r} does not import ({first}); run from the "
            "folder that holds it or add that folder to PYTHONPATH"
        ) from None
    value = getattr(module, attr, None)
    if not isinstance(value, Task):
        what = "nothing" if value is None else f"a {type(value).__name__}"
        raise UserError(
            f"--task {path!r}: {module_name}.{attr} is {what}, not a fedsafe.Task; define "
            f"{attr} = fedsafe.Task(...) in {module_name}"
        )
    return value


def build_task_model(task: Task, num_features: int, seed: int) -> nn.Module:
    """The task's initial model, the same at every site and the coordinator, checked for DP.

    See :func:`checked_task_model` (this returns its model; the note is logged).
    """
    checked = checked_task_model(task, num_features, seed)
    if checked.note:
        logging.getLogger("fedsafe").warning("%s", checked.note)
    return checked.model


def checked_task_model(task: Task, num_features: int, seed: int) -> CheckedModel:
    """The task's initial model checked for DP-SGD, with the one-line note of any fix.

    Parameters
    ----------
    task
        The task.
    num_features
        Input width (values per record).
    seed
        The run's seed: seeds the generator passed to the factory and torch's global one
        while it runs (restored afterwards). Public: the initial model is public.

    Returns
    -------
    CheckedModel
        The model (BatchNorm replaced by GroupNorm when Opacus can fix it) and the note
        naming the replaced layers ("" when nothing was changed).

    Raises
    ------
    UserError
        If the factory fails, returns no ``nn.Module``, or the model cannot be trained with
        DP-SGD even after Opacus's fixes.
    """
    # Opacus loads in seconds: only when a model is built, not in every importing process.
    from fedsafe.training.model_check import check_model_for_dp

    generator = torch.Generator().manual_seed(seed)  # public initial weights, not privacy
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # public initial weights, not privacy
        try:
            model = task.model(num_features, generator)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's factory: say which and why
            raise UserError(
                f"task {task.name!r}: its model factory failed ({type(exc).__name__}: {exc})"
            ) from None
    if not isinstance(model, nn.Module):
        raise UserError(
            f"task {task.name!r}: its model factory returned a {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return check_model_for_dp(model, name=f"task {task.name!r}'s model")


def site_data_from_tensors(
    name: str,
    train: Any,
    test: Any,
    feature_names: tuple[str, ...] = (),
) -> SiteData:
    """A :class:`SiteData` from ``(x, y)`` tensor pairs or map-style torch Datasets.

    Parameters
    ----------
    name
        The site's name.
    train, test
        Each a pair ``(x, y)`` of tensors or arrays (``x``: ``(n, ...)``, ``y``: ``(n,)``), or a
        ``torch.utils.data.Dataset`` of ``(x, y)`` items (read whole into memory).
    feature_names
        Names of the input values ("" names ``x0``, ``x1``, ... are made when empty).

    Raises
    ------
    ValueError
        If the splits are empty or disagree in shape.
    """

    def arrays(part: Any) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(part, tuple | list) and len(part) == 2:
            x, y = part
        else:
            items = [part[i] for i in range(len(part))]
            if not items:
                raise ValueError(f"site {name!r}: an empty split")
            x = torch.stack([torch.as_tensor(i[0]) for i in items])
            y = torch.stack([torch.as_tensor(i[1]) for i in items])
        xa = torch.as_tensor(x).detach().cpu().numpy().astype(np.float32)
        ya = torch.as_tensor(y).detach().cpu().numpy()
        ya = ya.astype(np.int64) if np.issubdtype(ya.dtype, np.integer) else ya.astype(np.float32)
        return xa, ya

    x_train, y_train = arrays(train)
    x_test, y_test = arrays(test)
    width = int(np.prod(x_train.shape[1:]))
    names = feature_names or tuple(f"x{i}" for i in range(width))
    return SiteData(name, x_train, y_train, x_test, y_test, names)


def load_task_site(task: Task, ref: SiteRef, flag: str) -> SiteData:
    """``task.load(ref)``, its failure or wrong type one :class:`UserError` line naming ``flag``."""
    which = f"site {ref.name} ({ref.data_path})" if ref.data_path else f"site {ref.index}"
    try:
        data: Any = task.load(ref)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's load(): say which site and why
        raise UserError(
            f"{flag}: load() failed for {which} ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(data, SiteData):
        raise UserError(
            f"{flag}: load() returned a {type(data).__name__} for {which}, not a fedsafe.SiteData "
            "(see fedsafe.tasks.task.site_data_from_tensors)"
        )
    return data
