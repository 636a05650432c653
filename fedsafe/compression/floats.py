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


@dataclass(frozen=True, slots=True)
class _FloatCoder(ValueCoder):
    """Values as little-endian IEEE floats of :attr:`wire_dtype`."""

    #: The numpy dtype on the wire (``"<f4"`` or ``"<f2"``).
    wire_dtype: ClassVar[str]

    def encode(
        self, values: NDArray[np.float64], rng: np.random.Generator, tensor: str
    ) -> tuple[bytes, NDArray[np.float64]]:
        """The values' bytes; ValueError for values beyond the format's range."""
        largest = float(np.finfo(self.wire_dtype).max)
        if values.size and float(np.max(np.abs(values))) > largest:
            raise ValueError(
                f"tensor {tensor!r} has values beyond {self.name}'s range (+-{largest:g}); "
                "use --compression int8, which scales each tensor"
            )
        coded = values.astype(self.wire_dtype)
        return coded.tobytes(), coded.astype(np.float64)

    @classmethod
    def decode(cls, reader: PayloadReader, count: int) -> NDArray[np.float64]:
        """``count`` values, each finite."""
        size = np.dtype(cls.wire_dtype).itemsize
        raw = reader.take(size * count, f"{cls.name} values")
        out = np.frombuffer(raw, dtype=cls.wire_dtype).astype(np.float64)
        if not np.all(np.isfinite(out)):
            raise reader.fail("non-finite value (NaN or inf)")
        return out

    def error_bound(self, values: NDArray[np.float64]) -> float:
        """Rounding: half an ulp (relative ``eps / 2``), or half the smallest subnormal."""
        info = np.finfo(self.wire_dtype)
        top = float(np.max(np.abs(values))) if values.size else 0.0
        return top * float(info.eps) / 2 + float(info.smallest_subnormal)


@dataclass(frozen=True, slots=True)
class Float32Coder(_FloatCoder):
    """Values as little-endian float32 (wire id 0); exact for float32 updates."""

    name: ClassVar[str] = "float32"
    wire_id: ClassVar[int] = 0
    forms: ClassVar[str] = "none"
    wire_dtype: ClassVar[str] = "<f4"


@dataclass(frozen=True, slots=True)
class Float16Coder(_FloatCoder):
    """Values as little-endian float16 (wire id 1); relative error at most ``2^-11``."""

    name: ClassVar[str] = "float16"
    wire_id: ClassVar[int] = 1
    forms: ClassVar[str] = "float16"
    wire_dtype: ClassVar[str] = "<f2"
