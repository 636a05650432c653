"""Site-level DP at the coordinator: its accountant and its line in the privacy report.

Each round the coordinator clips every site's update to norm ``C`` and adds Gaussian noise of
standard deviation ``sigma * C / m`` to the mean of the ``m`` clipped updates (McMahan et al.,
"Learning Differentially Private Recurrent Language Models", ICLR 2018, DP-FedAvg with every
site in every round). The denominator ``m`` is the number of sites that replied, which is
public (the noise std and ``rounds.jsonl`` show it), so neighbouring runs differ in one site's
update, not in its presence: replacing one clipped update by another moves the sum by up to
``2 C`` (two updates of norm ``C`` pointing opposite ways). Against noise of std ``sigma * C``
on the sum, each round is the Gaussian mechanism of multiplier ``sigma / 2``; ``T`` rounds are
its ``T``-fold composition, accounted here with Google's dp_accounting (privacy loss
distributions; every site takes part in every round, so there is no sampling to amplify).

What it protects: a whole site's contribution (all of its records together), against anyone who
sees the global models (the sites, whoever receives the final model), NOT against the
coordinator, which sees each site's update before the noise is added.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsafe.strict_json import strict_dumps

if TYPE_CHECKING:
    import dp_accounting

# dp_accounting (with scipy) is imported where used: the ServerApp imports this module, and a
# run without site-level DP should not pay seconds of imports before round 1 (issue 17).

#: The file of a run folder that records the coordinator's site-level releases.
SITE_DP_FILE = "site_dp.json"


@dataclass(frozen=True, slots=True)
class SiteLevelDP:
    """The coordinator's site-level Gaussian mechanism, released ``rounds`` times.

    Parameters
    ----------
    noise_multiplier
        ``sigma``: noise std on the sum of clipped updates / ``clip``, > 0.
    clip
        ``C``: L2 norm each site's update is clipped to, > 0.
    rounds
        Rounds released with this noise so far, >= 0.
    delta
        The delta the epsilon is reported at, in (0, 1).

    Raises
    ------
    ValueError
        If a value is out of range.
    """

    noise_multiplier: float
    clip: float
    rounds: int
    delta: float

    def __post_init__(self) -> None:
        for name, value in (("noise_multiplier", self.noise_multiplier), ("clip", self.clip)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"site-level DP {name} must be finite and > 0, got {value}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    def event(self) -> dp_accounting.DpEvent:
        """The released mechanism as a dp_accounting event (Gaussian, self-composed).

        Multiplier ``sigma / 2``: one replaced site moves the sum by up to ``2 C``.
        """
        import dp_accounting

        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(self.noise_multiplier / 2), self.rounds
        )

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` of every round released (0 before the first)."""
        if self.rounds == 0:
            return 0.0
        from dp_accounting.pld import PLDAccountant

        accountant = PLDAccountant()
        accountant.compose(self.event())
        return float(accountant.get_epsilon(self.delta))

    def to_mapping(self) -> dict[str, Any]:
        """The record written to :data:`SITE_DP_FILE`."""
        return {**asdict(self), "epsilon": self.epsilon(), "unit": "site"}


def write_site_dp(folder: Path, mechanism: SiteLevelDP) -> None:
    """Write ``mechanism`` (and its epsilon) to the run folder's :data:`SITE_DP_FILE`."""
    (Path(folder) / SITE_DP_FILE).write_text(strict_dumps(mechanism.to_mapping(), indent=1))


def site_level_paragraphs(folder: Path) -> list[str]:
    """The report's line for site-level DP (none when the run, or a ledger, had none)."""
    path = Path(folder) / SITE_DP_FILE
    if not path.is_file():
        return []
    raw = json.loads(path.read_text())
    return [
        "Site-level DP (a second, separate guarantee, added by the coordinator): what is "
        "protected is a whole site's contribution (all of its records together); from whom: "
        "anyone who sees the global models (the sites, whoever receives the final model), NOT"
        " the coordinator, which sees each site's update before adding the noise; how: each "
        f"site's update clipped to norm {raw['clip']:g}, Gaussian noise with noise multiplier "
        f"{raw['noise_multiplier']:g} added to their mean at each of {raw['rounds']} rounds "
        "(one site's update replaced moves their sum by up to twice the clip norm), "
        f"accounted with dp_accounting's PLD accountant: ε = {raw['epsilon']:.3g} at "
        f"δ = {raw['delta']:g}."
    ]
