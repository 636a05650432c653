"""Unbiased vector quantization after a random rotation: under one bit per value (``rvq``).

The update is rotated chunk by chunk as for ``rsign`` (:func:`fedsafe.compression.rotation.rotate`:
random signs, then an orthonormal Walsh-Hadamard transform; chunks padded to a power of two,
at least :data:`BLOCK`). The rotated coordinates are cut into blocks of :data:`BLOCK` = 16, and
each block is sent as the index (``bits`` bits) of the unit codeword with the largest inner
product with it, from a fixed spherical codebook of ``2^bits`` codewords. With ``bits = 11``
that is 11/16 = 0.69 bits per rotated value (0.72 per parameter of the MNIST CNN, padding
and scales included); ``rsign`` needs one bit (or subsampling, which costs
more error at the same rate).

Scale: one float32 per chunk, ``S = ||x||^2 / <y, Q>`` with ``y`` the rotated chunk and ``Q``
the concatenated codewords; the decoder returns the inverse rotation of ``S Q``. As for DRIVE
(Vargaftik et al., "DRIVE: One-bit Distributed Mean Estimation", NeurIPS 2021, Theorem 2),
this scale makes the estimate unbiased over the random rotation whatever the quantizer is,
and its normalised mean squared error is ``1 / cos^2(y, Q) - 1``. A random spherical codebook
is a random code in the sense of rate-distortion theory (Shannon 1959; Cover & Thomas,
"Elements of Information Theory", ch. 10): for rotated (nearly Gaussian) blocks of 16 it
gives an NMSE of about 0.86 at 11 bits, 0.75 at 12 and 0.65 at 13, against 1.28, 1.09 and
0.93 for ``rsign`` subsampled to the same rate (EDEN, Vargaftik et al., ICML 2022) and a
Shannon bound (unbiased) of 0.63, 0.55 and 0.48. Spherical k-means on the codebook was tried
and gained 2%, not worth shipping a trained table.

The codebook is a pure function of ``bits``: normal draws by Box-Muller from SplitMix64 of a
fixed seed (:data:`CODEBOOK_SEED`), normalised to unit length, so every site and coordinator
builds the same one on any platform without sending it. The rotation's seed is drawn
independently of the data, so the coding is post-processing of the DP release.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from fedsafe.compression.codec import ValueCoder, check_option
from fedsafe.compression.framing import PayloadReader, float32s, u8, u32, u64
from fedsafe.compression.randk import draw_seed, splitmix64
from fedsafe.compression.rotation import (
    DEFAULT_ROTATION_CHUNK,
    check_rotation_chunk,
    drive_scales,
    padded_chunks,
    read_rotation_chunk,
    rotate,
    rotated_length,
    unrotate,
)

#: Rotated values per codeword.
BLOCK = 16
#: Index bits per block accepted (codebooks of 2 .. 65,536 codewords).
MIN_BITS, MAX_BITS = 1, 16
#: Seed of the fixed codebooks (any constant; changing it changes the wire format).
CODEBOOK_SEED = 0x0F5AFE0C0DEB00C5
#: Blocks searched per matrix product (bounds the encoder's memory at 16 bits).
_SEARCH_ROWS = 256


@lru_cache(maxsize=4)
def codebook(bits: int) -> NDArray[np.float64]:
    """The ``2^bits x 16`` unit codewords of the ``bits``-bit codebook (read-only)."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"rvq bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    count = (1 << bits) * BLOCK
    with np.errstate(over="ignore"):
        words = splitmix64(np.arange(count, dtype=np.uint64) + np.uint64(CODEBOOK_SEED))
    # 53-bit uniforms in (0, 1), then Box-Muller on pairs.
    u = ((words >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u1, u2 = u[0::2], u[1::2]
    radius = np.sqrt(-2.0 * np.log(u1))
    normal = np.empty(count, dtype=np.float64)
    normal[0::2] = radius * np.cos(2.0 * np.pi * u2)
    normal[1::2] = radius * np.sin(2.0 * np.pi * u2)
    book = normal.reshape(1 << bits, BLOCK)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    book.setflags(write=False)
    return book


def rvq_layout(size: int, chunk: int) -> list[tuple[int, int, int]]:
    """Chunks of a flat update of ``size`` values, each padded to at least :data:`BLOCK`."""
    return padded_chunks(size, chunk, minimum=BLOCK)


def rvq_blocks(size: int, chunk: int) -> int:
    """Number of codeword indices sent for ``size`` values."""
    return rotated_length(size, chunk, minimum=BLOCK) // BLOCK


def pack_indices(indices: NDArray[np.int64], bits: int) -> bytes:
    """``bits``-bit indices, most significant bit first, zero-padded to whole bytes."""
    as_bits = np.unpackbits(indices.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)
    return np.packbits(as_bits[:, 32 - bits :].ravel()).tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> NDArray[np.int64] | None:
    """Inverse of :func:`pack_indices`; None if the length or the padding bits are wrong."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != (count * bits + 7) // 8:
        return None
    flat = np.unpackbits(raw)
    if np.any(flat[count * bits :]):
        return None
    rows = flat[: count * bits].reshape(count, bits).astype(np.int64)
    return rows @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))


def rvq_encode(
    x: NDArray[np.float64], chunk: int, seed: int, bits: int
) -> tuple[NDArray[np.float32], bytes, NDArray[np.float64]]:
    """Scales per chunk, packed codeword indices, and the decoding.

    Returns
    -------
    tuple
        ``(scales, index_bytes, decoded)``; ``decoded`` is what :func:`rvq_decode` returns.
    """
    values = np.asarray(x, dtype=np.float64).ravel()
    layout = rvq_layout(values.size, chunk)
    y = rotate(values, chunk, seed, minimum=BLOCK)
    blocks = y.reshape(-1, BLOCK)
    book = codebook(bits)
    indices = np.empty(blocks.shape[0], dtype=np.int64)
    for start in range(0, blocks.shape[0], _SEARCH_ROWS):
        part = blocks[start : start + _SEARCH_ROWS]
        indices[start : start + part.shape[0]] = np.argmax(part @ book.T, axis=1)
    scales = drive_scales(values, y, book[indices].ravel(), layout)
    index_bytes = pack_indices(indices, bits)
    decoded = rvq_decode(index_bytes, scales, values.size, chunk, seed, bits)
    assert decoded is not None
    return scales, index_bytes, decoded


def rvq_decode(
    index_bytes: bytes,
    scales: NDArray[np.float32],
    size: int,
    chunk: int,
    seed: int,
    bits: int,
) -> NDArray[np.float64] | None:
    """The unbiased estimate of the ``size`` values; None if the indices do not fit."""
    layout = rvq_layout(size, chunk)
    indices = unpack_indices(index_bytes, rvq_blocks(size, chunk), bits)
    if indices is None or len(layout) != scales.size:
        return None
    per_value = np.repeat(scales.astype(np.float64), [p for _, _, p in layout])
    y = codebook(bits)[indices].ravel() * per_value
    return unrotate(y, size, chunk, seed, minimum=BLOCK)


#: Index bits per 16 rotated values when none are given.
DEFAULT_BITS = 11


@dataclass(frozen=True, slots=True)
class RvqCoder(ValueCoder):
    """Rotated vector code, wire id 6, flat; unbiased only approximately, as ``rsign``.

    On the wire: ``seed`` (u64, the random signs'), ``bits`` (u8 in 1..16), ``chunk`` (u32, a
    power of two in [16, 2^24]), one float32 scale per rotation chunk, then
    ``ceil(blocks * bits / 8)`` bytes: one ``bits``-bit codeword index per 16 rotated values,
    most significant bit first, zero padding.

    Parameters
    ----------
    chunk
        Rotation chunk (a power of two in [16, 2^24]); None for 1024.
    bits
        Index bits per 16 rotated values, in 1..16; None for 11.
    """

    chunk: int | None = None
    bits: int | None = None
    name: ClassVar[str] = "rvq"
    wire_id: ClassVar[int] = 6
    forms: ClassVar[str] = "rvq, rvq:bits=B, rvq:chunk=P,bits=B"
    options: ClassVar[dict[str, Callable[[str], float]]] = {"chunk": int, "bits": int}
    flat: ClassVar[bool] = True
    downlink: ClassVar[bool] = False
    #: The random code's NMSE at 11 bits (module docstring), at default options.
    nmse: ClassVar[float | None] = 0.86

    def __post_init__(self) -> None:
        check_rotation_chunk(self.name, self.chunk, BLOCK)
        valid = self.bits is None or (
            isinstance(self.bits, int) and MIN_BITS <= self.bits <= MAX_BITS
        )
        check_option(valid, self.name, "bits", f"{MIN_BITS}..{MAX_BITS}", self.bits)

    def encode(
        self, values: NDArray[np.float64], rng: np.random.Generator, tensor: str
    ) -> tuple[bytes, NDArray[np.float64]]:
        """Seed, bits, chunk, scales and the codeword indices."""
        seed = draw_seed(rng)
        bits = self.bits if self.bits is not None else DEFAULT_BITS
        chunk = self.chunk if self.chunk is not None else DEFAULT_ROTATION_CHUNK
        scales, indices, decoded = rvq_encode(values, chunk, seed, bits)
        return u64(seed) + u8(bits) + u32(chunk) + float32s(scales) + indices, decoded

    @classmethod
    def decode(cls, reader: PayloadReader, count: int) -> NDArray[np.float64]:
        """The unbiased estimate of ``count`` values."""
        seed = reader.u64("rvq seed")
        bits = reader.u8("rvq bits")
        if not MIN_BITS <= bits <= MAX_BITS:
            raise reader.fail(f"rvq bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        chunk = read_rotation_chunk(reader, cls.name, BLOCK)
        scales = reader.scales(-(-count // chunk), "rvq")
        index_bytes = reader.take((rvq_blocks(count, chunk) * bits + 7) // 8, "rvq indices")
        decoded = rvq_decode(index_bytes, scales, count, chunk, seed, bits)
        return reader.finite(decoded, "rvq", "index")
