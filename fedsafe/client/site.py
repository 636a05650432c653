"""Which data a ClientApp trains on: a shipped scenario's partition, or a partner site's CSV.

In simulation, Flower gives each SuperNode a ``partition-id``; the site is that partition of
the run's scenario. In deployment, the site's own ``data-path`` and ``schema-path`` arrive
through the SuperNode's node config and never leave the site.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from fedsafe.config import RunConfig
from fedsafe.data.site_data import SiteData
from fedsafe.privacy.ledger import ledger_path_for


@dataclass(frozen=True, slots=True)
class SiteSetup:
    """A site's data and local policy (node config overrides the run config)."""

    data: SiteData
    model: str
    device: str
    ledger_path: str
    fingerprint: str
    budget_epsilon: float
    budget_delta: float

    @property
    def name(self) -> str:
        """The site's name."""
        return self.data.name


def stable_site_number(name: str) -> int:
    """A stable integer for a site name (for seeds that differ per site)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


@lru_cache(maxsize=4)
def _custom_site(name: str, data_path: str, schema_path: str) -> tuple[SiteData, str]:
    from fedsafe.data.schema import load_site_data

    data = load_site_data(name, data_path, schema_path)
    digest = hashlib.sha256(Path(data_path).read_bytes() + Path(schema_path).read_bytes())
    return data, digest.hexdigest()


@lru_cache(maxsize=16)
def _scenario_fingerprint(scenario: str, site: str, partition: str = "") -> str:
    """Hash of the shipped file, the scenario, the site and how the file was partitioned."""
    from fedsafe.data.heart import HEART_FILE
    from fedsafe.data.lending import LENDING_FILE
    from fedsafe.data.locate import data_file

    file = {"heart": HEART_FILE, "lending": LENDING_FILE, "mnist": "mnist.npz"}[scenario]
    digest = hashlib.sha256(data_file(file).read_bytes())
    digest.update(f"|{scenario}|{site}|{partition}".encode())
    return digest.hexdigest()


def resolve_site(context: Context, cfg: RunConfig) -> SiteSetup:
    """Resolve this node's site from its node config and the run config."""
    nc = context.node_config
    if "data-path" in nc:
        data_path, schema_path = str(nc["data-path"]), str(nc.get("schema-path", ""))
        name = str(nc.get("site-name", Path(data_path).stem))
        data, fingerprint = _custom_site(name, data_path, schema_path)
        model = "logreg"
    else:
        from fedsafe.simulations.scenarios import load_scenario

        scenario = load_scenario(cfg.scenario, cfg.lending_sites, cfg.mnist_sites, cfg.mnist_alpha)
        data = scenario.site(int(nc["partition-id"]))
        model = scenario.model
        partition = f"{cfg.mnist_sites}|{cfg.mnist_alpha}" if cfg.scenario == "mnist" else ""
        fingerprint = _scenario_fingerprint(cfg.scenario, data.name, partition)
    ledger = str(nc.get("ledger-path", ""))
    if not ledger and cfg.ledger_dir:
        ledger = str(ledger_path_for(cfg.ledger_dir, data.name))
    return SiteSetup(
        data=data,
        model=model,
        device=str(nc.get("device", cfg.device)),
        ledger_path=ledger,
        fingerprint=fingerprint,
        # The site's own policy (node config) wins over a simulation-wide budget.
        budget_epsilon=float(nc.get("budget-epsilon", cfg.budget_epsilon)),
        budget_delta=float(nc.get("budget-delta", cfg.budget_delta)),
    )
