"""Partitions of a centralized data set into sites: IID, or Dirichlet label skew.

The Dirichlet label-skew partition follows Hsu, Qi, Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification" (2019): for each class,
the share of its examples given to each site is drawn from ``Dirichlet(alpha, ..., alpha)``.
Small ``alpha`` (0.1) gives sites with a few classes each; large ``alpha`` (100) is close to
IID. Randomness comes from the generator passed in, so a seed gives the same partition.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def _check(labels: NDArray[np.integer], num_sites: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if labels.size < num_sites:
        raise ValueError(
            f"{labels.size} examples cannot give {num_sites} non-empty sites; use fewer sites"
        )


def iid_partition(
    labels: NDArray[np.integer], num_sites: int, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    """Shuffle and split into ``num_sites`` sites of equal size (within one).

    Returns
    -------
    list
        One sorted int64 index array per site; together they cover every example once.
    """
    _check(labels, num_sites)
    order = rng.permutation(labels.size)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_sites)]


def dirichlet_label_partition(
    labels: NDArray[np.integer],
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[NDArray[np.int64]]:
    """Split with per-class site shares drawn from ``Dirichlet(alpha)`` (Hsu et al. 2019).

    Parameters
    ----------
    labels
        Class label of each example.
    num_sites
        Number of sites.
    alpha
        Concentration, > 0: smaller is more skewed.
    rng
        Source of randomness.
    min_size
        Every site gets at least this many examples: a draw that leaves a site smaller is
        redrawn (up to 100 times), then the largest sites give examples to the smallest.

    Returns
    -------
    list
        One sorted int64 index array per site; together they cover every example once.
    """
    _check(labels, num_sites)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    if min_size * num_sites > labels.size:
        raise ValueError(f"min_size {min_size} x {num_sites} sites exceeds {labels.size} examples")
    classes = np.unique(labels)
    sites: list[list[int]] = []
    for _ in range(100):
        sites = [[] for _ in range(num_sites)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
            for index, part in enumerate(np.split(members, cuts)):
                sites[index].extend(part.tolist())
        if min(len(s) for s in sites) >= min_size:
            break
    else:
        # Very small alpha with many sites: move examples from the largest sites.
        for site in sites:
            while len(site) < min_size:
                donor = max(sites, key=len)
                site.append(donor.pop())
    return [np.sort(np.array(s, dtype=np.int64)) for s in sites]
