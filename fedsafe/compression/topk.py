"""Top-k sparsification and compact coding of the kept indices.

Top-k keeps the ``k`` entries of largest magnitude of each tensor and drops the rest; the site
keeps what was dropped and adds it back next round (error feedback, see
:mod:`fedsafe.compression.error_feedback`), following Lin, Han, Mao, Wang, Dally, "Deep
Gradient Compression", ICLR 2018 and Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory",
NeurIPS 2018.

Index coding
------------
The kept indices are sorted and sent as gaps ``g_0 = i_0`` and ``g_j = i_j - i_{j-1} - 1``
(all ``>= 0``). Two codings of the gaps are computed and the smaller one is sent:

- ``VARINT`` (LEB128): 7 bits per byte, high bit set on every byte but the last of a value.
  Good when most gaps are small and a few are large.
- ``BITPACK``: every gap in ``w`` bits, ``w`` the bit length of the largest gap (at least 1),
  packed most significant bit first, padded with zero bits to a whole byte.
  Good when the gaps are of similar size (top-k of noise: gaps about ``n / k``).

At ``k = n / 100`` the gaps average about 100, so either coding costs about 7-8 bits per index,
against 32 bits for a raw int32 index.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from fedsafe.compression.codec import Sparsifier, check_fraction
from fedsafe.compression.framing import PayloadReader, u8, u32


class IndexCoding(enum.IntEnum):
    """How the gaps between sorted kept indices are written on the wire."""

    VARINT = 1
    BITPACK = 2


def top_k_count(size: int, fraction: float) -> int:
    """Return how many entries top-k keeps of ``size`` values: ``ceil(fraction * size)``, >= 1."""
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(fraction * size)))


def top_k_indices(values: NDArray[np.float64], k: int) -> NDArray[np.int64]:
    """Sorted indices of the ``k`` entries of largest magnitude (ties broken by position)."""
    flat = np.abs(np.asarray(values, dtype=np.float64).ravel())
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.int64)
    # A stable sort makes the choice among equal magnitudes deterministic.
    order = np.argsort(-flat, kind="stable")[:k]
    return np.sort(order).astype(np.int64)


def indices_to_gaps(indices: NDArray[np.int64]) -> NDArray[np.uint64]:
    """Gaps of strictly increasing indices: ``i_0`` then ``i_j - i_{j-1} - 1``."""
    if indices.size == 0:
        return np.zeros(0, dtype=np.uint64)
    gaps = np.diff(indices, prepend=-1) - 1
    return gaps.astype(np.uint64)


def gaps_to_indices(gaps: NDArray[np.uint64]) -> NDArray[np.int64]:
    """Inverse of :func:`indices_to_gaps`."""
    return (np.cumsum(gaps.astype(np.int64) + 1) - 1).astype(np.int64)


def varint_encode(values: NDArray[np.uint64]) -> bytes:
    """LEB128 coding of non-negative integers (least significant 7-bit group first)."""
    if values.size == 0:
        return b""
    v = values.astype(np.uint64)
    bit_len = np.zeros(v.size, dtype=np.int64)
    rest = v.copy()
    while np.any(rest):
        bit_len += rest > 0
        rest >>= np.uint64(1)
    nbytes = np.maximum(1, -(-bit_len // 7))
    owner = np.repeat(np.arange(v.size), nbytes)
    starts = np.cumsum(nbytes) - nbytes
    position = np.arange(owner.size) - starts[owner]
    groups = (v[owner] >> (7 * position).astype(np.uint64)) & np.uint64(0x7F)
    last = position == nbytes[owner] - 1
    out = groups.astype(np.uint8) | np.where(last, 0, 0x80).astype(np.uint8)
    return out.tobytes()


def varint_decode(data: bytes, count: int, max_bytes: int = 5) -> NDArray[np.uint64] | None:
    """Decode exactly ``count`` LEB128 values filling ``data``; None if ``data`` is invalid.

    A value may take at most ``max_bytes`` bytes (5 covers 32-bit values).
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        return np.zeros(0, dtype=np.uint64) if raw.size == 0 else None
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != count or raw.size == 0 or ends[-1] != raw.size - 1:
        return None
    lengths = np.diff(ends, prepend=-1)
    if np.any(lengths > max_bytes):
        return None
    owner = np.repeat(np.arange(count), lengths)
    position = np.arange(raw.size) - (ends - lengths + 1)[owner]
    parts = (raw.astype(np.uint64) & np.uint64(0x7F)) << (7 * position).astype(np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    np.add.at(out, owner, parts)
    return out


def bitpack_encode(values: NDArray[np.uint64], width: int) -> bytes:
    """Each value in ``width`` bits, most significant first, zero-padded to a byte."""
    if values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel()).tobytes()


def bitpack_decode(data: bytes, count: int, width: int) -> NDArray[np.uint64] | None:
    """Inverse of :func:`bitpack_encode`; None if the length or the padding is wrong."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != -(-count * width // 8):
        return None
    bits = np.unpackbits(raw)
    if np.any(bits[count * width :]):
        return None
    matrix = bits[: count * width].reshape(count, width).astype(np.uint64)
    weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
    return (matrix * weights[None, :]).sum(axis=1, dtype=np.uint64)


def bit_width(gaps: NDArray[np.uint64]) -> int:
    """Bits needed for the largest gap, at least 1."""
    if gaps.size == 0:
        return 1
    return max(1, int(gaps.max()).bit_length())


def encode_indices(indices: NDArray[np.int64]) -> tuple[IndexCoding, int, bytes]:
    """Code sorted indices with the smaller of varint and bit-packing.

    Returns
    -------
    tuple
        ``(coding, width, payload)``; ``width`` is the bit width for ``BITPACK``, 0 for varint.
    """
    gaps = indices_to_gaps(indices)
    width = bit_width(gaps)
    packed = bitpack_encode(gaps, width)
    varint = varint_encode(gaps)
    if len(varint) < len(packed):
        return IndexCoding.VARINT, 0, varint
    return IndexCoding.BITPACK, width, packed


@dataclass(frozen=True, slots=True)
class TopK(Sparsifier):
    """Top-k, sparsity id 1: the largest magnitudes, their indices coded as gaps.

    On the wire: ``k`` (u32, ``1 <= k <= numel``), the index coding (u8: 1 varint, 2 bitpack,
    then u8 width in 1..32), the coded gaps' byte length (u32) and the gaps.

    Parameters
    ----------
    fraction
        Fraction of each tensor's entries kept, in (0, 1] (at least one entry).
    """

    fraction: float
    name: ClassVar[str] = "topk"
    wire_id: ClassVar[int] = 1
    forms: ClassVar[str] = "topk:F, topk:F+int8, topk:F+int4:chunk=N, topk:F+float16"

    def __post_init__(self) -> None:
        check_fraction(type(self), self.fraction)

    def select(
        self, values: NDArray[np.float64], rng: np.random.Generator
    ) -> tuple[bytes, NDArray[np.int64]]:
        """The ``k`` largest magnitudes' indices, coded the shorter way."""
        k = top_k_count(values.size, self.fraction)
        indices = top_k_indices(values, k)
        coding, width, index_bytes = encode_indices(indices)
        width_byte = u8(width) if coding is IndexCoding.BITPACK else b""
        header = u32(k) + u8(int(coding)) + width_byte + u32(len(index_bytes)) + index_bytes
        return header, indices

    @classmethod
    def read(cls, reader: PayloadReader, numel: int) -> NDArray[np.int64]:
        """``k`` indices in ``[0, numel)``, strictly increasing."""
        k = reader.u32("k")
        if not 1 <= k <= numel:
            raise reader.fail(f"k = {k} outside [1, {numel}]")
        coding = reader.u8("index coding")
        if coding == IndexCoding.BITPACK:
            width = reader.u8("bit width")
            if not 1 <= width <= 32:
                raise reader.fail(f"index bit width {width} outside [1, 32]")
            gaps = bitpack_decode(reader.take(reader.u32("index length"), "indices"), k, width)
        elif coding == IndexCoding.VARINT:
            gaps = varint_decode(reader.take(reader.u32("index length"), "indices"), k)
        else:
            raise reader.fail(f"unknown index coding {coding} (1 varint, 2 bitpack)")
        if gaps is None:
            raise reader.fail(f"index bytes do not hold exactly {k} coded gaps")
        # Checked before the cumulative sum so that huge gaps cannot wrap around int64.
        if float(gaps.astype(np.float64).sum()) + k > numel + 0.5:
            raise reader.fail(f"index out of range: the gaps run past {numel} elements")
        indices = gaps_to_indices(gaps)
        if indices[-1] >= numel:
            raise reader.fail(f"index {int(indices[-1])} out of range for {numel} elements")
        return indices
