"""Byte-level framing shared by the wire format and the codecs: writers and a bounded reader.

Every integer on the wire is little-endian (see :mod:`fedsafe.compression.wire`). The reader
refuses to read past the payload, and :meth:`PayloadReader.need` lets a codec check that the
bytes a declared count implies are really there *before* it allocates anything of that size,
so a short payload claiming a huge count costs nothing (issue 16: 40 bytes claiming ``2^32 - 1``
values made the coordinator allocate 32 GiB).
"""

from __future__ import annotations

import struct

import numpy as np
from numpy.typing import NDArray


class MalformedPayloadError(ValueError):
    """A reply that does not follow the wire format; the reply must be dropped."""


def u8(value: int) -> bytes:
    """``value`` as one unsigned byte."""
    return struct.pack("<B", value)


def u16(value: int) -> bytes:
    """``value`` as a little-endian unsigned 16-bit integer."""
    return struct.pack("<H", value)


def u32(value: int) -> bytes:
    """``value`` as a little-endian unsigned 32-bit integer."""
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    """``value`` as a little-endian unsigned 64-bit integer."""
    return struct.pack("<Q", value)


def float32s(values: NDArray[np.floating]) -> bytes:
    """``values`` as little-endian float32 (scales)."""
    return np.asarray(values).astype("<f4").tobytes()


class PayloadReader:
    """Bounds-checked reader over a payload; every failure names the field and the offset.

    Parameters
    ----------
    data
        The payload.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.where = "header"

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.pos

    def fail(self, why: str) -> MalformedPayloadError:
        """The error to raise, naming where in the payload ``why`` was found."""
        return MalformedPayloadError(
            f"malformed compressed update ({self.where}, byte {self.pos} of {len(self.data)}): "
            f"{why}"
        )

    def need(self, n: int, field: str) -> None:
        """Raise unless ``n`` more bytes are present (checked before allocating for them)."""
        if n < 0 or n > self.left:
            raise self.fail(f"truncated: {field} needs {n} bytes, {self.left} left")

    def take(self, n: int, field: str) -> bytes:
        """The next ``n`` bytes."""
        self.need(n, field)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, field: str) -> int:
        """The next unsigned byte."""
        return int(self.take(1, field)[0])

    def u16(self, field: str) -> int:
        """The next unsigned 16-bit integer."""
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        """The next unsigned 32-bit integer."""
        return int(struct.unpack("<I", self.take(4, field))[0])

    def u64(self, field: str) -> int:
        """The next unsigned 64-bit integer."""
        return int(struct.unpack("<Q", self.take(8, field))[0])

    def scales(self, count: int, what: str) -> NDArray[np.float32]:
        """``count`` float32 scales, each finite and >= 0."""
        scales = np.frombuffer(self.take(4 * count, "scales"), dtype="<f4")
        if not np.all(np.isfinite(scales)):
            raise self.fail(f"{what} scale is not finite (NaN or inf)")
        if np.any(scales < 0):
            raise self.fail(f"{what} scale is negative")
        return scales

    def finite(
        self, decoded: NDArray[np.float64] | None, what: str, unit: str
    ) -> NDArray[np.float64]:
        """A codec's decoding: None means bad padding after the last ``unit``; else finite."""
        if decoded is None:
            raise self.fail(f"non-zero padding bits after the last {what} {unit}")
        if not np.all(np.isfinite(decoded)):
            raise self.fail(f"{what} values are not finite (NaN, inf or a scale too large)")
        return decoded
