"""Privacy events: each release of a site described as an immutable value.

Following Google's ``dp_accounting`` (``PoissonSampledDpEvent``, ``GaussianDpEvent``,
``SelfComposedDpEvent``), a mechanism is a value and accountants only interpret those values.
One round of DP-SGD at a site is ``steps`` compositions of the Poisson-subsampled Gaussian
mechanism (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PoissonGaussianEvent:
    """``steps`` self-compositions of a Poisson-subsampled Gaussian mechanism.

    Parameters
    ----------
    sample_rate
        Probability that each record enters a batch (Poisson sampling), in (0, 1].
    noise_multiplier
        Standard deviation of the Gaussian noise divided by the clipping norm, > 0.
    steps
        Number of noisy optimizer steps taken with this sampling and noise, >= 1.
    """

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        if not (0.0 < self.sample_rate <= 1.0) or not math.isfinite(self.sample_rate):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not (self.noise_multiplier > 0.0) or not math.isfinite(self.noise_multiplier):
            raise ValueError(
                f"noise_multiplier must be finite and > 0, got {self.noise_multiplier}"
            )
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps}")

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a plain dictionary (for JSON and the ledger)."""
        return {"kind": "poisson_gaussian", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoissonGaussianEvent:
        """Rebuild an event written by :meth:`to_dict`."""
        if data.get("kind") != "poisson_gaussian":
            raise ValueError(f"not a poisson_gaussian event: {data!r}")
        return cls(
            sample_rate=float(data["sample_rate"]),
            noise_multiplier=float(data["noise_multiplier"]),
            steps=int(data["steps"]),
        )
