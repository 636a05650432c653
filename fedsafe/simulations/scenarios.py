"""Ready scenarios on real data: which sites exist and which model they train."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from fedsafe.data.site_data import SiteData

#: The model each scenario trains; known to the coordinator without reading any site's data.
MODEL_OF: dict[str, str] = {"heart": "logreg", "lending": "mlp", "custom": "logreg"}
#: The headline metric of each scenario (FLamby's accuracy for heart; ROC AUC when imbalanced).
HEADLINE_OF: dict[str, str] = {"heart": "accuracy", "lending": "roc-auc", "custom": "accuracy"}


def default_num_sites(scenario: str, lending_sites: int) -> int:
    """How many sites a shipped scenario has (custom federations default to 2)."""
    return {"heart": 4, "lending": lending_sites}.get(scenario, 2)


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


@lru_cache(maxsize=8)
def load_scenario(name: str, lending_sites: int = 4) -> Scenario:
    """Load a shipped scenario by name (``heart`` or ``lending``)."""
    if name == "heart":
        from fedsafe.data.heart import load_heart_sites

        return Scenario("heart", load_heart_sites(), MODEL_OF["heart"], HEADLINE_OF["heart"])
    if name == "lending":
        from fedsafe.data.lending import load_lending_sites

        sites = load_lending_sites(lending_sites)
        return Scenario("lending", sites, MODEL_OF["lending"], HEADLINE_OF["lending"])
    raise ValueError(f"unknown scenario {name!r}; choose heart or lending")
