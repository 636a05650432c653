"""One-bit sign coding with a mean-magnitude scale per chunk (scaled signSGD).

A chunk ``x`` is sent as its signs and one float32 scale ``s = mean|x|``; the decoder returns
``s * sign(x)`` (``+s`` for ``x >= 0``). For fixed signs this scale minimises the squared error
``||x - s * sign(x)||^2``. The code is biased, so it is only used with error feedback (the site
keeps ``x - s * sign(x)`` and adds it to the next round's update), which is what makes signSGD
converge like SGD: Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other
Gradient Compression Schemes", ICML 2019 (their scaled sign uses ``||x||_1 / d``, the same
scale). Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018,
is the unscaled original.

Bits are packed most significant first (``numpy.packbits``), 1 for ``+s`` and 0 for ``-s``, and
padded with zero bits to a whole byte; the decoder rejects non-zero padding.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fedsafe.compression.quantize import chunk_lengths, chunk_starts


def sign_encode(values: NDArray[np.float64], chunk: int) -> tuple[bytes, NDArray[np.float32]]:
    """Signs of ``values`` packed to bits, and one float32 ``mean|x|`` per chunk."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return b"", np.zeros(0, dtype=np.float32)
    sums = np.add.reduceat(np.abs(x), chunk_starts(x.size, chunk))
    scales = (sums / chunk_lengths(x.size, chunk)).astype(np.float32)
    return np.packbits(x >= 0.0).tobytes(), scales


def sign_decode(
    data: bytes, scales: NDArray[np.float32], count: int, chunk: int
) -> NDArray[np.float64] | None:
    """Inverse of :func:`sign_encode`; None if the length or the padding bits are wrong."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != (count + 7) // 8:
        return None
    bits = np.unpackbits(raw)
    if np.any(bits[count:]):
        return None
    signs = bits[:count].astype(np.float64) * 2.0 - 1.0
    if count == 0:
        return np.zeros(0, dtype=np.float64)
    return signs * np.repeat(scales.astype(np.float64), chunk_lengths(count, chunk))
