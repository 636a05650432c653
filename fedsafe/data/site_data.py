"""A site's data, split and normalized, as an immutable value."""

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


def normalize_with_train_stats(
    x_train: NDArray[np.float64], x_test: NDArray[np.float64], eps: float = 1e-9
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Normalize both splits with the training split's mean and unbiased std (FLamby's rule)."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0, ddof=1) if len(x_train) > 1 else np.zeros(x_train.shape[1])
    std = np.nan_to_num(std)
    return (
        ((x_train - mean) / (std + eps)).astype(np.float32),
        ((x_test - mean) / (std + eps)).astype(np.float32),
    )


def split_indices(
    labels: NDArray[np.float32], seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Split 66/34 with sklearn, stratified when both classes have more than 2 rows (FLamby)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels.astype(np.int64), minlength=2)
    stratify = labels if counts.min() > 2 else None
    train, test = train_test_split(
        np.arange(len(labels)),
        train_size=0.66,
        test_size=0.34,
        random_state=seed,
        shuffle=True,
        stratify=stratify,
    )
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
