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

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from fedsafe.compression.codec import ValueCoder
from fedsafe.compression.framing import PayloadReader
from fedsafe.compression.quantize import (
    check_chunk,
    chunk_header,
    chunk_lengths,
    chunk_starts,
    read_chunk_and_scales,
)


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


@dataclass(frozen=True, slots=True)
class SignCoder(ValueCoder):
    """Scaled sign, wire id 4; biased, so used with error feedback.

    On the wire: ``chunk`` (u32 >= 1), ``ceil(m / chunk)`` float32 scales, then
    ``ceil(m / 8)`` bytes of signs.
    """

    #: Values per scale; None for one scale per tensor.
    chunk: int | None = None
    name: ClassVar[str] = "sign"
    wire_id: ClassVar[int] = 4
    forms: ClassVar[str] = "sign, sign:chunk=N"
    options: ClassVar[dict[str, Callable[[str], float]]] = {"chunk": int}
    needs_error_feedback: ClassVar[bool] = True
    downlink: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_chunk(self.name, self.chunk)

    def encode(
        self, values: NDArray[np.float64], rng: np.random.Generator, tensor: str
    ) -> tuple[bytes, NDArray[np.float64]]:
        """Chunk, mean-magnitude scales and the packed signs."""
        chunk = self.chunk if self.chunk is not None else max(1, values.size)
        bits, scales = sign_encode(values, chunk)
        decoded = sign_decode(bits, scales, values.size, chunk)
        assert decoded is not None
        return chunk_header(chunk, scales) + bits, decoded

    @classmethod
    def decode(cls, reader: PayloadReader, count: int) -> NDArray[np.float64]:
        """Chunk, scales and ``count`` signs; non-zero padding bits are rejected."""
        chunk, scales = read_chunk_and_scales(reader, count, cls.name)
        signs = sign_decode(reader.take((count + 7) // 8, "sign bits"), scales, count, chunk)
        return reader.finite(signs, "sign", "bit")

    def error_bound(self, values: NDArray[np.float64]) -> float:
        """``|s sign(x) - x| <= |x| + s <= 2 max|x|`` (``s`` a chunk's mean magnitude)."""
        top = float(np.max(np.abs(values))) if values.size else 0.0
        return 2.0 * top * (1.0 + 2.0**-22)
