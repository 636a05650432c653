"""Values sent as floats: float32 (exact for float32 updates) and float16 (half the bytes).

``float32`` is the value coder of a pipeline with no other (``none``, or ``topk:F`` alone);
``float16`` rounds to IEEE 754 half precision, relative error at most ``2^-11`` for normal
values, and refuses values beyond its range (``+-65504``) rather than send infinities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from fedsafe.compression.codec import ValueCoder
from fedsafe.compression.framing import PayloadReader

FLOAT16_MAX = float(np.finfo(np.float16).max)
#: Largest gap between 0 and a float16 (its smallest subnormal), for the error bound.
_FLOAT16_TINY = float(np.finfo(np.float16).smallest_subnormal)


def _read_floats(reader: PayloadReader, count: int, dtype: str, what: str) -> NDArray[np.float64]:
    size = np.dtype(dtype).itemsize
    values = np.frombuffer(reader.take(size * count, f"{what} values"), dtype=dtype)
    out = values.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise reader.fail("non-finite value (NaN or inf)")
    return out


@dataclass(frozen=True, slots=True)
class Float32Coder(ValueCoder):
    """Values as little-endian float32 (wire id 0); exact for float32 updates."""

    name: ClassVar[str] = "float32"
    wire_id: ClassVar[int] = 0
    forms: ClassVar[str] = "none"

    def encode(
        self, values: NDArray[np.float64], rng: np.random.Generator, tensor: str
    ) -> tuple[bytes, NDArray[np.float64]]:
        """The float32 bytes of ``values``."""
        coded = values.astype("<f4")
        return coded.tobytes(), coded.astype(np.float64)

    @classmethod
    def decode(cls, reader: PayloadReader, count: int) -> NDArray[np.float64]:
        """``count`` float32 values."""
        return _read_floats(reader, count, "<f4", "float32")

    def error_bound(self, values: NDArray[np.float64]) -> float:
        """Rounding to float32: half an ulp, relative ``2^-24``, plus its smallest subnormal."""
        top = float(np.max(np.abs(values))) if values.size else 0.0
        return top * 2.0**-24 + float(np.finfo(np.float32).smallest_subnormal)


@dataclass(frozen=True, slots=True)
class Float16Coder(ValueCoder):
    """Values as little-endian float16 (wire id 1)."""

    name: ClassVar[str] = "float16"
    wire_id: ClassVar[int] = 1
    forms: ClassVar[str] = "float16"

    def encode(
        self, values: NDArray[np.float64], rng: np.random.Generator, tensor: str
    ) -> tuple[bytes, NDArray[np.float64]]:
        """The float16 bytes of ``values``; ValueError beyond float16's range."""
        if values.size and float(np.max(np.abs(values))) > FLOAT16_MAX:
            raise ValueError(
                f"tensor {tensor!r} has values beyond float16's range (+-{FLOAT16_MAX:g}); "
                "use --compression int8, which scales each tensor"
            )
        coded = values.astype("<f2")
        return coded.tobytes(), coded.astype(np.float64)

    @classmethod
    def decode(cls, reader: PayloadReader, count: int) -> NDArray[np.float64]:
        """``count`` float16 values."""
        return _read_floats(reader, count, "<f2", "float16")

    def error_bound(self, values: NDArray[np.float64]) -> float:
        """Rounding to float16: relative ``2^-11``, plus half its smallest subnormal."""
        top = float(np.max(np.abs(values))) if values.size else 0.0
        return top * 2.0**-11 + _FLOAT16_TINY
