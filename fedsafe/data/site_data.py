"""A site's data, split and scaled, as an immutable value.

How the values got here is the business of :mod:`fedsafe.data.scaling` (public ranges) and
:mod:`fedsafe.data.split` (per-record keyed split); no statistic of the site's records is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, slots=True)
class SiteData:
    """One site's train and test split, ready for training.

    Parameters
    ----------
    name
        Site name (a hospital, a state, or the name a partner gave its site).
    x_train, y_train
        Training features (float32, one row per record: 2-D for tables, 4-D for images) and
        labels (float32 0/1 for binary tasks, int64 classes for multi-class ones).
    x_test, y_test
        Held-out test split used for federated evaluation.
    feature_names
        Column names of the features, in order.
    """

    name: str
    x_train: NDArray[np.float32]
    y_train: NDArray[Any]
    x_test: NDArray[np.float32]
    y_test: NDArray[Any]
    feature_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x_train.ndim < 2 or self.x_test.ndim < 2:
            raise ValueError(f"site {self.name!r}: features must have one row per record")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"site {self.name!r}: train and test have different feature counts")
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"site {self.name!r}: features and labels differ in length")
        if len(self.x_train) == 0:
            raise ValueError(f"site {self.name!r}: empty training split")

    @property
    def num_features(self) -> int:
        """Number of input values per record."""
        return int(np.prod(self.x_train.shape[1:]))
