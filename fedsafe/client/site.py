"""Which data a ClientApp trains on, under which policy: deployed site or simulated one.

Whether a site is simulated is decided by its own node config, never by the run config:

* **Deployed**: the node config holds ``policy-path`` (``fedsafe site start`` always passes
  it), and ``data-path``, ``schema-path``, ``ledger-path``. The site's policy
  (:mod:`fedsafe.client.policy`) binds; DP is always on; the run config cannot turn it off,
  seed the noise, or choose the ledger or the budget.
* **Simulated**: the node config holds Flower's simulation keys (``partition-id``,
  ``num-partitions``; Flower 1.42's simulation engine gives its virtual SuperNodes these and
  nothing else) and no ``data-path`` or ``policy-path``. The person running ``fedsafe
  simulate`` is both coordinator and sites, so the run config may ask for ``--no-dp`` or
  reproducible noise; such runs are marked "not private" in every output.
* Anything else (``data-path`` without ``policy-path``) is refused with a site-local error.
"""

from __future__ import annotations

import copy
import hashlib
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Context

from fedsafe.client.phase_profile import phase
from fedsafe.client.policy import PolicyError, SitePolicy, load_policy, public_size_of
from fedsafe.config import RunConfig
from fedsafe.data.site_data import SiteData
from fedsafe.privacy.budget import PrivacyBudget
from fedsafe.privacy.ledger import ledger_path_for, simulated_account
from fedsafe.tasks.task import SiteRef, Task, build_task_model, load_task

#: Node-config keys Flower's simulation engine gives every virtual SuperNode.
SIMULATION_KEYS = ("partition-id", "num-partitions")

#: The ledger account of a deployed site. Its lifetime budget protects the site's records, not
#: one version of its files: keyed by a digest of the data and schema bytes, any edit (a new
#: row, a fixed typo, a comment in the schema) opened a fresh account with the whole budget on
#: the same patients. Every release in a deployed site's own ledger (``ledger-path``) is
#: therefore composed against its policy's budget; a truly new data set needs a new ledger,
#: which is the site admin's explicit decision.
DEPLOYED_ACCOUNT = "site-records"


@dataclass(frozen=True, slots=True)
class SiteSetup:
    """A site's data and the policy it trains under.

    Parameters
    ----------
    data
        The site's records (train and test splits).
    model
        The model name for its data.
    device
        ``auto``, ``cpu`` or ``cuda`` (node config, else run config).
    ledger_path
        The site's privacy ledger ("" = none; a deployed site always has one).
    fingerprint
        The ledger account spent on: the data set's fingerprint at a simulated site,
        :data:`DEPLOYED_ACCOUNT` at a deployed one.
    public_size
        The public, rounded training-set size used for the sample rate and released counts.
    budget
        The lifetime budget, or None (simulation without ``--site-budget``).
    policy
        The deployed site's own policy; None for a simulated site.
    task
        The :class:`~fedsafe.tasks.task.Task` it trains (its model, loss and metrics), or
        None: fedsafe's model named ``model``.
    task_path
        The task's ``package.module:attr`` as the site chose it ("" = the scenario's or the
        schema's own); a deployed site refuses a run asking for another.

    shared_account
        Whether ``ledger_path`` is the account of a source shared by several simulated sites
        (:data:`fedsafe.privacy.ledger.SHARED_SOURCE_ACCOUNTS`); each site's stored releases
        then sit beside a ledger path of its own name (:attr:`releases_beside`).
    """

    data: SiteData
    model: str
    device: str
    ledger_path: str
    fingerprint: str
    public_size: int
    budget: PrivacyBudget | None
    policy: SitePolicy | None
    task: Task | None = None
    task_path: str = ""

    shared_account: bool = False

    def __post_init__(self) -> None:
        if self.public_size < 1:
            raise ValueError(f"public size must be >= 1, got {self.public_size}")
        if self.policy is not None and not self.ledger_path:
            raise PolicyError("a deployed site needs a ledger (node config 'ledger-path')")

    @property
    def name(self) -> str:
        """The site's name."""
        return self.data.name

    @property
    def releases_beside(self) -> str:
        """The path this site's stored releases sit beside: its ledger, or its own name there."""
        if not self.shared_account or not self.ledger_path:
            return self.ledger_path
        return str(ledger_path_for(Path(self.ledger_path).parent, self.name))

    @property
    def simulated(self) -> bool:
        """Whether the site is a simulated one (no policy file: Flower's simulation engine)."""
        return self.policy is None


def initial_model(site: SiteSetup, seed: int) -> torch.nn.Module:
    """The run's initial model for ``site``'s data (the same at every site and the coordinator).

    A new module each call. fedsafe's own models are built once per process and name, width
    and seed, then copied (:func:`_model_template`): a train message builds one to evaluate the
    received model and one to train it, and building seeds a generator each time. A task's
    model is built by the task every time (its code may depend on more than these three).
    """
    if site.task is not None:
        return build_task_model(site.task, site.data.num_features, seed)
    return copy.deepcopy(_model_template(site.model, site.data.num_features, seed))


@lru_cache(maxsize=8)
def _model_template(name: str, num_features: int, seed: int) -> torch.nn.Module:
    """The model ``name`` of fedsafe as built from ``seed`` (never handed out: copies are)."""
    from fedsafe.models import build_model

    return build_model(name, num_features, seed)


def evaluation_metrics(site: SiteSetup, model: torch.nn.Module) -> dict[str, float]:
    """The global model's declared test-split metrics at ``site`` (``eval-<name>``, no count).

    A task reports the metrics it declares (:attr:`~fedsafe.tasks.task.Task.metrics`); its own
    loss gives ``eval-loss``. Without a task: loss, accuracy and, binary, ROC and PR AUC.
    """
    from fedsafe.training.dp_training import evaluate_model, resolve_device

    device = resolve_device(site.device)
    result = evaluate_model(model, site.data.x_test, site.data.y_test, device)
    values = {"loss": result.loss, "accuracy": result.accuracy}
    if result.roc_auc is not None and result.pr_auc is not None:
        values["roc-auc"], values["pr-auc"] = result.roc_auc, result.pr_auc
    if site.task is None:
        return {f"eval-{k}": v for k, v in values.items()}
    if "loss" in site.task.metrics:
        values["loss"] = site_task_loss(site.task, model, site.data, device)
    return {f"eval-{k}": values[k] for k in site.task.metrics if k in values}


def site_task_loss(
    task: Task, model: torch.nn.Module, data: SiteData, device: torch.device
) -> float:
    """Mean of the task's loss over the test split."""
    model.to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data.x_test), 256):
            x = torch.from_numpy(data.x_test[i : i + 256]).to(device)
            y = torch.from_numpy(data.y_test[i : i + 256]).to(device)
            total += float(task.loss(model(x), y).sum())
            count += len(x)
    return total / max(count, 1)


#: The task a ClientApp built with :func:`fedsafe.client_app` was given (None: fedsafe's app).
_APP_TASK: list[Task] = []


def bind_app_task(task: Task) -> None:
    """Make ``task`` the one this process's ClientApp trains (:func:`fedsafe.client_app`)."""
    _APP_TASK[:] = [task]


def _site_task(cfg: RunConfig, node_task: str) -> tuple[Task | None, str]:
    """The task a site trains, and its path: the node config's first, then the app's.

    The node config's is the site's own choice (``fedsafe site start --task``); the app's is
    the one :func:`fedsafe.client_app` bound; None when neither names one.
    """
    if node_task:
        return load_task(node_task), node_task
    if _APP_TASK:
        return _APP_TASK[0], cfg.task
    return None, ""


def stable_site_number(name: str) -> int:
    """A stable integer for a site name (for seeds that differ per site)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


@lru_cache(maxsize=4)
def _custom_site(name: str, data_path: str, schema_path: str) -> tuple[SiteData, str]:
    """A bring-your-own site's data and the model its schema chooses."""
    from fedsafe.data.schema import prepare_site

    prepared = prepare_site(name, data_path, schema_path)
    return prepared.data, prepared.schema.model_name


#: Public run-config values a task's ``load`` may read (:class:`~fedsafe.tasks.task.SiteRef`).
_TASK_OPTIONS = ("lending-sites", "mnist-sites", "mnist-alpha", "seed")

_TASK_SITES: dict[tuple[int, SiteRef], SiteData] = {}


def _task_site(task: Task, ref: SiteRef) -> SiteData:
    """A task's site data, loaded once per process (a task's ``load`` may read files)."""
    key = (id(task), ref)
    if key not in _TASK_SITES:
        data = task.load(ref)
        if not isinstance(data, SiteData):
            raise TypeError(
                f"task {task.name!r}: load() returned a {type(data).__name__}, not a "
                "fedsafe.SiteData (see fedsafe.tasks.task.site_data_from_tensors)"
            )
        if len(_TASK_SITES) >= 8:
            _TASK_SITES.clear()  # bounded: a process serves few sites
        _TASK_SITES[key] = data
    return _TASK_SITES[key]


@lru_cache(maxsize=1024)
def _scenario_fingerprint(scenario: str, site: str, partition: str = "") -> str:
    """Hash of the shipped file, the scenario, the site and how the file was partitioned."""
    digest = _shipped_file_digest(scenario).copy()  # the file is hashed once per process
    digest.update(f"|{scenario}|{site}|{partition}".encode())
    return digest.hexdigest()


@lru_cache(maxsize=4)
def _shipped_file_digest(scenario: str) -> hashlib._Hash:
    """SHA-256 state after a scenario's shipped file (copied, never updated in place)."""
    from fedsafe.data.heart import HEART_FILE
    from fedsafe.data.lending import LENDING_FILE
    from fedsafe.data.locate import data_file

    file = {"heart": HEART_FILE, "lending": LENDING_FILE, "mnist": "mnist.npz"}[scenario]
    return hashlib.sha256(data_file(file).read_bytes())


def is_simulated(node_config: object) -> bool:
    """Whether a node config is that of a simulated site (see the module docstring)."""
    nc = dict(node_config)  # type: ignore[call-overload]
    return (
        all(k in nc for k in SIMULATION_KEYS) and "data-path" not in nc and "policy-path" not in nc
    )


def resolve_site(context: Context, cfg: RunConfig) -> SiteSetup:
    """Resolve this node's site and policy from its node config (and, simulated, the run config).

    Raises
    ------
    PolicyError
        If the node config names data but no policy, or the policy file is invalid.
    """
    with phase("site-data"):
        return _resolve_site(context, cfg)


def _resolve_site(context: Context, cfg: RunConfig) -> SiteSetup:
    nc = context.node_config
    if "policy-path" in nc:
        policy = load_policy(str(nc["policy-path"]))
        if "data-path" not in nc:
            raise PolicyError("a deployed site needs its data (node config 'data-path')")
        data_path, schema_path = str(nc["data-path"]), str(nc.get("schema-path", ""))
        name = str(nc.get("site-name", Path(data_path).stem))
        root = str(nc.get("task-root", ""))
        if root and root not in sys.path:
            sys.path.insert(0, root)  # the site's own task module (fedsafe site start --task)
        task, task_path = _site_task(cfg, str(nc.get("task", "")))
        if task is not None:
            data, model = (
                _task_site(task, SiteRef(name=name, data_path=data_path, schema_path=schema_path)),
                task.name,
            )
        else:
            data, model = _custom_site(name, data_path, schema_path)
        return SiteSetup(
            data=data,
            model=model,
            task=task,
            task_path=task_path,
            device=str(nc.get("device", "auto")),
            # Only the site's node config names the ledger: never the run config's ledger-dir.
            ledger_path=str(nc.get("ledger-path", "")),
            # One account for the site's records, whatever edits its files have seen.
            fingerprint=DEPLOYED_ACCOUNT,
            public_size=policy.public_size,
            budget=PrivacyBudget(policy.budget_epsilon, policy.delta),
            policy=policy,
        )
    if not is_simulated(nc):
        raise PolicyError(
            "this site has no policy (node config 'policy-path'); write one with "
            "`fedsafe site init` and start the site with `fedsafe site start`"
        )
    from fedsafe.tasks.scenarios import load_scenario, simulated_site_paths

    task, task_path = _site_task(cfg, "")
    if task is None and cfg.task:
        task, task_path = load_task(cfg.task), cfg.task
    if task is not None:
        index = int(nc["partition-id"])  # type: ignore[arg-type]
        name, path = "", ""
        if cfg.site_data:
            name, path = simulated_site_paths(cfg.site_data)[index]
        ref = SiteRef(
            index,
            int(nc["num-partitions"]),
            name,
            path,
            cfg.schema_path,  # type: ignore[arg-type]
            {k: v for k, v in cfg.to_mapping().items() if k in _TASK_OPTIONS},
        )
        data, model = _task_site(task, ref), task.name
        # The account follows the task and the site (and its file), never the file's bytes.
        fingerprint = f"task|{task_path or task.name}|{data.name}|" + (
            str(Path(path).resolve()) if path else ""
        )
    elif cfg.scenario == "custom":
        # One researcher owns both sides in simulation: the run config names the CSVs.
        name, path = simulated_site_paths(cfg.site_data)[int(nc["partition-id"])]  # type: ignore[arg-type]
        data, model = _custom_site(name, path, cfg.schema_path)
        # The account follows the data source (the file), not its bytes: a re-export or a
        # schema comment must not open a fresh account.
        fingerprint = "csv|" + str(Path(path).resolve())
    else:
        scenario = load_scenario(cfg.scenario, cfg.lending_sites, cfg.mnist_sites, cfg.mnist_alpha)
        data = scenario.site(int(nc["partition-id"]))  # type: ignore[arg-type]
        partition = f"{cfg.mnist_sites}|{cfg.mnist_alpha}" if cfg.scenario == "mnist" else ""
        fingerprint = _scenario_fingerprint(cfg.scenario, data.name, partition)
        model = scenario.model
    account = simulated_account(cfg.scenario, data.name)  # MNIST: one account for the source
    ledger = str(ledger_path_for(cfg.ledger_dir, account)) if cfg.ledger_dir else ""
    budget = None
    if cfg.budget_epsilon > 0:
        budget = PrivacyBudget(cfg.budget_epsilon, cfg.budget_delta or cfg.target_delta)
    return SiteSetup(
        data=data,
        model=model,
        task=task,
        task_path=task_path,
        device=str(nc.get("device", cfg.device)),
        ledger_path=ledger,
        fingerprint=fingerprint,
        public_size=public_size_of(len(data.x_train)),
        budget=budget,
        policy=None,
        shared_account=account != data.name,
    )
