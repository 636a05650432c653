"""Unbiased stochastic quantization to int8 or int4, one scale per tensor or per chunk.

This is the stochastic rounding of QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017) with a
max-norm scale: a chunk ``x`` gets the scale ``s = max|x| / L`` (``L = 127`` for int8, ``7`` for
int4) and each value ``v = x_i / s`` is rounded to ``floor(v) + 1`` with probability
``v - floor(v)``, else to ``floor(v)``. Hence ``E[q_i * s] = x_i`` (unbiased) and
``|q_i * s - x_i| < s`` (the error bound the tests check).

The randomness comes from an explicit :class:`numpy.random.Generator`, never from global state.
Levels are symmetric (``-L..L``): the int8 code ``-128`` and the int4 nibble ``0`` are never
written, so a decoder can reject them as malformed.

Codecs ``int8`` (wire id 2) and ``int4`` (wire id 3), option ``chunk=N`` (values per scale).
On the wire: ``chunk`` (u32 >= 1), ``ceil(m / chunk)`` float32 scales (finite, >= 0), then
``m`` bytes (int8) or ``ceil(m / 2)`` bytes, two levels per byte, low nibble first, level + 8
(int4).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from fedsafe.compression.codec import ValueCoder, check_option
from fedsafe.compression.framing import PayloadReader, float32s, u32

INT8_LEVELS = 127
INT4_LEVELS = 7
#: Offset added to an int4 level so that ``-7..7`` is stored as the nibble ``1..15``.
INT4_OFFSET = 8


def chunk_starts(size: int, chunk: int) -> NDArray[np.int64]:
    """Start offsets of the chunks of ``chunk`` values covering ``size`` values."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return np.arange(0, size, chunk, dtype=np.int64)


def chunk_lengths(size: int, chunk: int) -> NDArray[np.int64]:
    """Length of each chunk (the last one may be shorter)."""
    starts = chunk_starts(size, chunk)
    return np.diff(np.append(starts, size)).astype(np.int64)


def max_norm_scales(values: NDArray[np.float64], levels: int, chunk: int) -> NDArray[np.float32]:
    """Per-chunk float32 scales ``s`` with ``s * levels >= max|x|`` over each chunk.

    The scale is rounded up to the next float32 where needed, so that ``|x / s| <= levels``
    holds for the scale that is actually sent.
    """
    if values.size == 0:
        return np.zeros(0, dtype=np.float32)
    amax = np.maximum.reduceat(np.abs(values), chunk_starts(values.size, chunk))
    scales = (amax / levels).astype(np.float32)
    short = scales.astype(np.float64) * levels < amax
    scales[short] = np.nextafter(scales[short], np.float32(np.inf))
    return scales


def stochastic_quantize(
    values: NDArray[np.float64], levels: int, chunk: int, rng: np.random.Generator
) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """Quantize ``values`` to integers in ``[-levels, levels]`` with unbiased rounding.

    Parameters
    ----------
    values
        Finite values, one dimension.
    levels
        Largest level ``L`` (127 for int8, 7 for int4).
    chunk
        Number of consecutive values sharing one scale (``values.size`` for one per tensor).
    rng
        Source of the rounding randomness.

    Returns
    -------
    tuple
        ``(q, scales)``: the levels as int8 and one float32 scale per chunk.

    References
    ----------
    Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", NeurIPS 2017.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    scales = max_norm_scales(x, levels, chunk)
    if x.size == 0:
        return np.zeros(0, dtype=np.int8), scales
    per_value = np.repeat(scales.astype(np.float64), chunk_lengths(x.size, chunk))
    safe = np.where(per_value > 0.0, per_value, 1.0)
    scaled = np.where(per_value > 0.0, x / safe, 0.0)
    q = np.floor(scaled + rng.random(x.size))
    q = np.clip(q, -levels, levels)
    return q.astype(np.int8), scales


def dequantize(q: NDArray[np.int8], scales: NDArray[np.float32], chunk: int) -> NDArray[np.float64]:
    """Return ``q * s`` with each value's chunk scale ``s``, as float64."""
    if q.size == 0:
        return np.zeros(0, dtype=np.float64)
    per_value = np.repeat(scales.astype(np.float64), chunk_lengths(q.size, chunk))
    return q.astype(np.float64) * per_value


def pack_int4(q: NDArray[np.int8]) -> bytes:
    """Pack levels in ``[-7, 7]`` two per byte: first value in the low nibble.

    An odd count leaves the high nibble of the last byte at 0 (padding).
    """
    nibbles = (q.astype(np.int16) + INT4_OFFSET).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return packed.astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> tuple[NDArray[np.int8], bool]:
    """Unpack ``count`` int4 levels; the flag is False if a nibble or the padding is invalid."""
    raw = np.frombuffer(data, dtype=np.uint8)
    nibbles = np.empty(raw.size * 2, dtype=np.uint8)
    nibbles[0::2] = raw & 0x0F
    nibbles[1::2] = raw >> 4
    values, padding = nibbles[:count], nibbles[count:]
    ok = bool(np.all(values != 0)) and bool(np.all(padding == 0))
    return (values.astype(np.int16) - INT4_OFFSET).astype(np.int8), ok


def check_chunk(codec: str, chunk: int | None) -> None:
    """Raise :class:`CodecOptionError` unless ``chunk`` is None or an integer in [1, 2^32)."""
    valid = chunk is None or (isinstance(chunk, int) and 1 <= chunk < 2**32)
    check_option(valid, codec, "chunk", "[1, 2^32) (an integer)", chunk)


def chunk_header(chunk: int, scales: NDArray[np.float32]) -> bytes:
    """The wire's ``chunk`` (u32) and its float32 scales, as int8, int4 and sign send them."""
    return u32(chunk) + float32s(scales)


def read_chunk_and_scales(
    reader: PayloadReader, count: int, codec: str
) -> tuple[int, NDArray[np.float32]]:
    """Read ``chunk`` (>= 1) and its ``ceil(count / chunk)`` scales, each finite and >= 0."""
    chunk = reader.u32("chunk size")
    if chunk < 1:
        raise reader.fail("chunk size must be >= 1, got 0")
    # Counted, not listed: a chunk of 1 would otherwise allocate before the scales are there.
    return chunk, reader.scales(-(-count // chunk), codec)


@dataclass(frozen=True, slots=True)
class _StochasticCoder(ValueCoder):
    """Stochastic rounding to ``-levels..levels`` with one max-norm scale per chunk."""

    #: Values per scale; None for one scale per tensor.
    chunk: int | None = None
    options: ClassVar[dict[str, Callable[[str], float]]] = {"chunk": int}
    unbiased: ClassVar[bool] = True
    levels: ClassVar[int]

    def __post_init__(self) -> None:
        check_chunk(self.name, self.chunk)

    @staticmethod
    @abstractmethod
    def pack(levels: NDArray[np.int8]) -> bytes:
        """The levels' bytes."""

    @staticmethod
    @abstractmethod
    def unpack(reader: PayloadReader, count: int) -> NDArray[np.int8]:
        """``count`` levels, checked (``reader.fail`` on an invalid one)."""

    def encode(
        self, values: NDArray[np.float64], rng: np.random.Generator, tensor: str
    ) -> tuple[bytes, NDArray[np.float64]]:
        """Chunk, scales and the stochastically rounded levels."""
        chunk = self.chunk if self.chunk is not None else max(1, values.size)
        q, scales = stochastic_quantize(values, self.levels, chunk, rng)
        return chunk_header(chunk, scales) + self.pack(q), dequantize(q, scales, chunk)

    @classmethod
    def decode(cls, reader: PayloadReader, count: int) -> NDArray[np.float64]:
        """Chunk, scales and ``count`` levels, dequantized."""
        chunk, scales = read_chunk_and_scales(reader, count, cls.name)
        return dequantize(cls.unpack(reader, count), scales, chunk)

    def error_bound(self, values: NDArray[np.float64]) -> float:
        """``|q s - x| < s <= max|x| / levels`` (the scale is rounded up to a float32)."""
        top = float(np.max(np.abs(values))) if values.size else 0.0
        return top / self.levels * (1.0 + 2.0**-22)


@dataclass(frozen=True, slots=True)
class Int8Coder(_StochasticCoder):
    """Stochastic int8 (wire id 2): one byte per value, levels ``-127..127``."""

    name: ClassVar[str] = "int8"
    wire_id: ClassVar[int] = 2
    forms: ClassVar[str] = "int8, int8:chunk=N"
    levels: ClassVar[int] = INT8_LEVELS

    @staticmethod
    def pack(levels: NDArray[np.int8]) -> bytes:
        """One signed byte per level."""
        return levels.tobytes()

    @staticmethod
    def unpack(reader: PayloadReader, count: int) -> NDArray[np.int8]:
        """``count`` signed bytes; -128 is outside the symmetric range."""
        q = np.frombuffer(reader.take(count, "int8 values"), dtype=np.int8)
        if np.any(q == -128):
            raise reader.fail("int8 level -128 is outside the symmetric range -127..127")
        return q


@dataclass(frozen=True, slots=True)
class Int4Coder(_StochasticCoder):
    """Stochastic int4 (wire id 3): two values per byte, levels ``-7..7``."""

    name: ClassVar[str] = "int4"
    wire_id: ClassVar[int] = 3
    forms: ClassVar[str] = "int4, int4:chunk=N"
    levels: ClassVar[int] = INT4_LEVELS

    @staticmethod
    def pack(levels: NDArray[np.int8]) -> bytes:
        """Two levels per byte (:func:`pack_int4`)."""
        return pack_int4(levels)

    @staticmethod
    def unpack(reader: PayloadReader, count: int) -> NDArray[np.int8]:
        """``count`` nibbles; nibble 0 (level -8) and non-zero padding are invalid."""
        q, ok = unpack_int4(reader.take((count + 1) // 2, "int4 values"), count)
        if not ok:
            raise reader.fail("int4 nibble 0 (level -8) or non-zero padding nibble")
        return q
