"""Feature scaling from public constants: a declared range per numeric feature, never the data.

Each numeric feature declares a range ``[low, high]`` in its own units (a clinical or
regulatory range, a published product limit) and where that range comes from. A value is
clipped to the range and mapped affinely onto the fixed interval ``[-1, 1]``:

    scaled = -1 + 2 * (clip(value, low, high) - low) / (high - low)

So a record's scaled features are a function of that record and of public constants only.
Scaling with the mean and standard deviation of a site's training records (FLamby's rule,
fedsafe's before) makes every scaled value, every gradient and every evaluation figure an
exact function of all training records: removing one record moves every other record's
clipped gradient, which the DP-SGD analysis (Abadi et al. 2016, "Deep Learning with
Differential Privacy", CCS) does not account for, and the released test metrics reveal the
training statistics. A feature constant in the training rows also divided test values by a
zero standard deviation (a factor of 1e9). Clipping to a public range bounds every scaled
value to ``[-1, 1]`` whatever the site's rows hold.

Ranges estimated with differential privacy (and accounted in the site's ledger) would be an
alternative; fedsafe instead refuses a numeric feature without a declared range and says how
to add one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: Every numeric feature is mapped onto this fixed interval.
SCALED_LOW = -1.0
SCALED_HIGH = 1.0


@dataclass(frozen=True, slots=True)
class FeatureRange:
    """The public range of one numeric feature, in the feature's own units.

    Parameters
    ----------
    low, high
        Finite bounds, ``low < high``; values outside are clipped to them.
    source
        Where the bounds come from (a guideline, a product limit, a unit's physical range):
        never the site's own minimum and maximum.

    Raises
    ------
    ValueError
        If a bound is not finite, ``low >= high``, or ``source`` is blank.
    """

    low: float
    high: float
    source: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"range [{self.low}, {self.high}] must have finite bounds")
        if not self.low < self.high:
            raise ValueError(f"range [{self.low}, {self.high}] needs low < high")
        if not self.source.strip():
            raise ValueError("a range needs a source (where its public bounds come from)")

    def scale(self, values: NDArray[np.floating]) -> NDArray[np.float64]:
        """Clip ``values`` to the range and map them affinely onto ``[-1, 1]``.

        Parameters
        ----------
        values
            Raw values of this feature, any shape, in the feature's units; finite.

        Returns
        -------
        numpy.ndarray
            float64 array of the same shape, every entry in ``[-1, 1]``.
        """
        clipped = np.clip(np.asarray(values, dtype=np.float64), self.low, self.high)
        unit = (clipped - self.low) / (self.high - self.low)
        return SCALED_LOW + (SCALED_HIGH - SCALED_LOW) * unit

    def count_outside(self, values: NDArray[np.floating]) -> int:
        """How many of ``values`` lie outside the range (and are therefore clipped)."""
        v = np.asarray(values, dtype=np.float64)
        return int(np.count_nonzero((v < self.low) | (v > self.high)))

    def describe(self) -> str:
        """``[low, high] (source)`` for summaries."""
        return f"[{self.low:g}, {self.high:g}] ({self.source})"
