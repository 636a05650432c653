"""Ready scenarios on real data: which sites exist and which model they train."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedsafe.data.site_data import SiteData

#: The model each scenario trains; known to the coordinator without reading any site's data.
MODEL_OF: dict[str, str] = {
    "heart": "logreg",
    "lending": "mlp",
    "mnist": "mnist_cnn",
    "custom": "logreg",
}
#: The headline metric of each scenario (FLamby's accuracy for heart; ROC AUC when imbalanced).
HEADLINE_OF: dict[str, str] = {
    "heart": "accuracy",
    "lending": "roc-auc",
    "mnist": "accuracy",
    "custom": "accuracy",
}
#: Seed of the fixed data partitions and splits (FLamby's split seed).
PARTITION_SEED = 43


def default_num_sites(scenario: str, lending_sites: int = 4, mnist_sites: int = 10) -> int:
    """How many sites a shipped scenario has (custom federations default to 2)."""
    return {"heart": 4, "lending": lending_sites, "mnist": mnist_sites}.get(scenario, 2)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named set of sites with the model and headline metric they use."""

    name: str
    sites: tuple[SiteData, ...]
    model: str
    headline_metric: str

    @property
    def num_features(self) -> int:
        """Input width shared by all sites."""
        return self.sites[0].num_features

    def site(self, index: int) -> SiteData:
        """The site at ``index`` (a simulation's partition id)."""
        if not 0 <= index < len(self.sites):
            raise ValueError(
                f"partition {index} does not exist: scenario {self.name!r} has "
                f"{len(self.sites)} sites; set the simulation's num-supernodes to {len(self.sites)}"
            )
        return self.sites[index]


def mnist_sites(num_sites: int, alpha: float) -> tuple[SiteData, ...]:
    """MNIST's training set split over sites: Dirichlet label skew (alpha > 0) or IID (0).

    Each site keeps 85% of its share for training and 15% as its own test split, so a site's
    test split follows its own label distribution.
    """
    import numpy as np

    from fedsafe.data.mnist import load_mnist
    from fedsafe.data.partition import dirichlet_label_partition, iid_partition
    from fedsafe.freed_memory import return_freed_memory

    data = load_mnist()
    rng = np.random.default_rng(PARTITION_SEED)
    if alpha > 0:
        parts = dirichlet_label_partition(data.y_train, num_sites, alpha, rng, min_size=20)
    else:
        parts = iid_partition(data.y_train, num_sites, rng)
    sites = []
    for i, idx in enumerate(parts):
        idx = rng.permutation(idx)
        cut = int(round(0.85 * len(idx)))
        train, test = idx[:cut], idx[cut:]
        sites.append(
            SiteData(
                f"site-{i:03d}",
                data.x_train[train],
                data.y_train[train],
                data.x_train[test],
                data.y_train[test],
                ("pixels",),
            )
        )
    # Each site holds copies of its rows; the whole normalized training set is garbage now.
    # Processes that keep freed memory (simulated sites' workers) would keep it resident.
    del data
    return_freed_memory()
    return tuple(sites)


def simulated_site_paths(site_data: str) -> tuple[tuple[str, str], ...]:
    """The simulated bring-your-own sites of run config ``site-data``: (name, CSV path) pairs.

    ``site-data`` is a JSON list of ``[name, path]`` pairs, written by ``fedsafe simulate
    --site NAME=data.csv``; site ``i`` is Flower's partition ``i``.

    Raises
    ------
    ValueError
        If ``site_data`` is not such a list.
    """
    try:
        pairs = json.loads(site_data)
    except ValueError:
        pairs = None
    if (
        not isinstance(pairs, list)
        or not pairs
        or not all(isinstance(p, list) and len(p) == 2 for p in pairs)
    ):
        raise ValueError(
            "run config 'site-data' must be a JSON list of [name, csv path] pairs; "
            "use fedsafe simulate --site NAME=data.csv --schema schema.yaml"
        )
    return tuple((str(name), str(path)) for name, path in pairs)


def run_model_name(cfg: Any) -> str:
    """The model a run trains: its scenario's, or the one the shared schema chooses (custom)."""
    if cfg.scenario == "custom" and cfg.schema_path:
        from fedsafe.data.schema import load_schema

        return load_schema(cfg.schema_path).model_name
    return MODEL_OF[cfg.scenario]


@lru_cache(maxsize=8)
def load_scenario(
    name: str, lending_sites: int = 4, mnist_count: int = 10, mnist_alpha: float = 0.5
) -> Scenario:
    """Load a shipped scenario by name (``heart``, ``lending`` or ``mnist``)."""
    if name == "heart":
        from fedsafe.data.heart import load_heart_sites

        return Scenario("heart", load_heart_sites(), MODEL_OF["heart"], HEADLINE_OF["heart"])
    if name == "lending":
        from fedsafe.data.lending import load_lending_sites

        sites = load_lending_sites(lending_sites)
        return Scenario("lending", sites, MODEL_OF["lending"], HEADLINE_OF["lending"])
    if name == "mnist":
        sites = mnist_sites(mnist_count, mnist_alpha)
        return Scenario("mnist", sites, MODEL_OF["mnist"], HEADLINE_OF["mnist"])
    raise ValueError(f"unknown scenario {name!r}; choose heart, lending or mnist")
