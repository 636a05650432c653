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
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

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
