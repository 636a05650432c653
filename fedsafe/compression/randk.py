"""Random-k sparsification whose kept positions follow from a seed, so no index is sent.

Top-k must send where its kept entries are (about 5-8 bits per entry, see
:mod:`fedsafe.compression.topk`). Random-k keeps a pseudo-random subset instead, drawn from a
64-bit seed that travels with the update, so the decoder rebuilds the same subset and the
update costs only its values (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS
2018, analyse random-k and top-k with error feedback alike; Konecny et al., "Federated
Learning: Strategies for Improving Communication Efficiency", 2016, send random masks as a
seed). Under DP-SGD every coordinate of an update carries Gaussian noise, so top-k's choice by
magnitude mostly picks noise, and paying for its indices buys little.

The mask
--------
Entry ``i`` of a tensor is kept iff ``splitmix64(seed + i) < threshold`` (arithmetic modulo
``2^64``), with ``threshold = round(fraction * 2^64)`` (``2^64 - 1`` for fraction 1). SplitMix64
is the finalizer of Steele, Lea, Flood, "Fast Splittable Pseudorandom Number Generators",
OOPSLA 2014; it is fixed here, not taken from numpy's generators, so that sites and
coordinator running different numpy versions agree on every mask. The number kept is
binomial around ``fraction * numel`` and may be 0 for a small tensor; the error-feedback
residual keeps what was not sent.

The seed is drawn by the site, independently of its data, so sending it reveals nothing about
the data: the mask is post-processing like the rest of compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from fedsafe.compression.codec import Sparsifier, check_fraction
from fedsafe.compression.framing import PayloadReader, u32, u64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_FULL = 2**64 - 1


def splitmix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """SplitMix64 of each value (Steele, Lea, Flood 2014), modulo ``2^64``."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def threshold_for(fraction: float) -> int:
    """The 64-bit threshold that keeps each entry with probability ``fraction`` in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"random-k fraction must be in (0, 1], got {fraction}")
    return min(_FULL, round(fraction * 2.0**64))


def random_mask_indices(seed: int, threshold: int, numel: int) -> NDArray[np.int64]:
    """Sorted indices kept by the mask of ``seed`` and ``threshold`` over ``numel`` entries.

    Parameters
    ----------
    seed
        The update's 64-bit seed for this tensor.
    threshold
        Entries whose hash is below it are kept (see :func:`threshold_for`).
    numel
        Number of entries of the tensor.
    """
    if not 0 <= seed <= _FULL or not 0 <= threshold <= _FULL:
        raise ValueError("seed and threshold must be 64-bit unsigned integers")
    positions = np.arange(numel, dtype=np.uint64)
    with np.errstate(over="ignore"):
        hashed = splitmix64(positions + np.uint64(seed))
    return np.flatnonzero(hashed < np.uint64(threshold)).astype(np.int64)


def draw_seed(rng: np.random.Generator) -> int:
    """A fresh 64-bit seed for a mask or a rotation, drawn independently of the data."""
    return int(rng.integers(0, 2**64, dtype=np.uint64))


def read_seed_and_threshold(reader: PayloadReader, what: str) -> tuple[int, int]:
    """A mask's u64 seed and u64 threshold (>= 1), as random-k and rsign send them."""
    seed = reader.u64(f"{what} seed")
    threshold = reader.u64(f"{what} threshold")
    if threshold < 1:
        raise reader.fail(f"{what} threshold must be >= 1")
    return seed, threshold


@dataclass(frozen=True, slots=True)
class RandomK(Sparsifier):
    """Random-k, sparsity id 2: a seeded mask, so no index is sent.

    On the wire: ``seed`` (u64), ``threshold`` (u64 >= 1), ``k`` (u32, the number of entries
    the seed's mask keeps, checked), then the kept values.

    Parameters
    ----------
    fraction
        Expected fraction of each tensor's entries kept, in (0, 1].
    """

    fraction: float
    name: ClassVar[str] = "randk"
    wire_id: ClassVar[int] = 2
    forms: ClassVar[str] = "randk:F+sign:chunk=N, randk:F+int8"

    def __post_init__(self) -> None:
        check_fraction(type(self), self.fraction)

    def select(
        self, values: NDArray[np.float64], rng: np.random.Generator
    ) -> tuple[bytes, NDArray[np.int64]]:
        """A fresh seed from ``rng``, the threshold, and the mask's count."""
        seed = draw_seed(rng)
        threshold = threshold_for(self.fraction)
        indices = random_mask_indices(seed, threshold, values.size)
        return u64(seed) + u64(threshold) + u32(indices.size), indices

    @classmethod
    def read(cls, reader: PayloadReader, numel: int) -> NDArray[np.int64]:
        """The mask of the sent seed; its count must be the sent ``k``."""
        seed, threshold = read_seed_and_threshold(reader, "random-k")
        k = reader.u32("k")
        if k > numel:
            raise reader.fail(f"k = {k} outside [0, {numel}]")
        indices = random_mask_indices(seed, threshold, numel)
        if indices.size != k:
            raise reader.fail(f"k = {k} but the seed's mask keeps {indices.size} entries")
        return indices
