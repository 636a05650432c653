"""What a codec is: the contract every value coder and sparsifier module fulfils.

A codec owns, in its one module, its name in ``--compression``, its options (converted and
validated once, when the codec value is built), its wire id, its encoder and its decoder. The
wire format (:mod:`fedsafe.compression.wire`) only frames tensors and dispatches through the
registry (:mod:`fedsafe.compression.registry`); nothing about a codec is written twice.

Two kinds, applied in this order to each tensor's (or the flat update's) values:

- :class:`Sparsifier`: picks which entries are sent (top-k, random-k); the wire's ``sparsity``
  byte is its id, 0 meaning dense.
- :class:`ValueCoder`: codes the sent values (float32, float16, int8, int4, sign, rsign, rvq);
  the wire's ``value codec`` byte is its id.

Codec values are immutable (``@dataclass(frozen=True, slots=True)``) and compare by their
options, so ``parse_compression(p.spec) == p``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Self

import numpy as np
from numpy.typing import NDArray

from fedsafe.compression.framing import PayloadReader
from fedsafe.errors import UserError


class CodecOptionError(UserError):
    """A codec option that is unknown or out of range; the message names it and the range."""


def check_option(valid: bool, codec: str, option: str, bounds: str, value: object) -> None:
    """Raise :class:`CodecOptionError` unless ``valid`` (``codec option must be in bounds``)."""
    if not valid:
        raise CodecOptionError(f"{codec} {option} must be in {bounds}, got {value}")


def is_fraction(value: float | None) -> bool:
    """True for a finite number in (0, 1]."""
    return value is not None and math.isfinite(value) and 0.0 < value <= 1.0


class _Named(ABC):
    """What both kinds share: a spec name, a wire id and the forms shown in errors."""

    __slots__ = ()
    #: Name in ``--compression``.
    name: ClassVar[str]
    #: Id byte on the wire (unique within the kind).
    wire_id: ClassVar[int]
    #: The spec forms it accepts, for the "Valid forms" part of an error.
    forms: ClassVar[str]


class ValueCoder(_Named):
    """Codes the values a tensor sends; subclasses are frozen dataclasses of their options.

    Every field is an option with a default of None (the codec's default), so ``Coder()`` is
    the codec with default options, and ``name:key=value,...`` in a spec sets fields.
    """

    __slots__ = ()
    #: Option converters by option name (``int`` or ``float``); the dataclass validates.
    options: ClassVar[dict[str, Callable[[str], float]]] = {}
    #: Codes the whole update as one flat vector (rotated codes); takes no sparsifier.
    flat: ClassVar[bool] = False
    #: Biased, so the site keeps an error-feedback residual.
    needs_error_feedback: ClassVar[bool] = False
    #: ``E[decode(encode(x))] = x`` over the codec's randomness.
    unbiased: ClassVar[bool] = False
    #: May code the global model on the downlink (no residual there; error must be small).
    downlink: ClassVar[bool] = True

    @classmethod
    def from_options(cls, text: str) -> Self:
        """The codec from a spec's ``key=value,...`` (empty for defaults).

        Raises
        ------
        CodecOptionError
            Naming the unknown or out-of-range option.
        """
        values: dict[str, float] = {}
        for option in text.split(",") if text else []:
            key, _, raw = option.partition("=")
            key = key.strip()
            convert = cls.options.get(key)
            if convert is None:
                raise CodecOptionError(f"unknown option {option!r} for {cls.name}")
            try:
                values[key] = convert(raw.strip())
            except ValueError:
                raise CodecOptionError(
                    f"{cls.name} {key} must be {'an integer' if convert is int else 'a number'}, "
                    f"got {raw!r}"
                ) from None
        return cls(**values)

    @property
    def spec(self) -> str:
        """The canonical spec of this codec (its name, then the options that are set)."""
        set_options = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) is not None
        ]
        return self.name + (":" + ",".join(set_options) if set_options else "")

    @abstractmethod
    def encode(
        self, values: NDArray[np.float64], rng: np.random.Generator, tensor: str
    ) -> tuple[bytes, NDArray[np.float64]]:
        """Code ``values`` (1-d, finite).

        Returns
        -------
        tuple
            ``(payload, decoded)``: the bytes after the codec id, and exactly what
            :meth:`decode` will return for them.

        Raises
        ------
        ValueError
            If the values cannot be coded (naming ``tensor`` and the fix).
        """

    @classmethod
    @abstractmethod
    def decode(cls, reader: PayloadReader, count: int) -> NDArray[np.float64]:
        """Read ``count`` values (the codec id already read); finite, 1-d, float64.

        ``count`` has been checked against the model's layout. A codec checks the bytes its
        declared parameters imply with ``reader.need``/``reader.take`` before it allocates.

        Raises
        ------
        MalformedPayloadError
            Through ``reader.fail``, for any field out of range, truncation or bad padding.
        """

    def error_bound(self, values: NDArray[np.float64]) -> float | None:
        """A bound on ``max |decode(encode(values)) - values|`` that always holds.

        None where the error is bounded only in expectation (see :attr:`nmse`).
        """
        return None

    #: An upper bound on the expected ``||decoded - x||^2 / ||x||^2`` at default options,
    #: for codes with no sure per-value bound (None when not claimed).
    nmse: ClassVar[float | None] = None


class Sparsifier(_Named):
    """Chooses the entries of a tensor that are sent; subclasses are frozen dataclasses."""

    __slots__ = ()
    #: The (expected) fraction of entries kept, in (0, 1] (the subclass's one field).
    fraction: float

    @classmethod
    def from_argument(cls, text: str) -> Self:
        """The sparsifier from a spec's argument (the fraction after ``name:``)."""
        try:
            fraction = float(text)
        except ValueError:
            raise CodecOptionError(
                f"{cls.name} needs a fraction, e.g. {cls.name}:0.01, got {text!r}"
            ) from None
        return cls(fraction)  # type: ignore[call-arg]  # every sparsifier's one field

    @property
    def spec(self) -> str:
        """``name:fraction``."""
        return f"{self.name}:{self.fraction!r}"

    @abstractmethod
    def select(
        self, values: NDArray[np.float64], rng: np.random.Generator
    ) -> tuple[bytes, NDArray[np.int64]]:
        """The bytes after the sparsity id, and the sorted indices of the entries sent."""

    @classmethod
    @abstractmethod
    def read(cls, reader: PayloadReader, numel: int) -> NDArray[np.int64]:
        """The sorted indices sent, each in ``[0, numel)`` (the sparsity id already read)."""


def check_fraction(cls: type[Any], fraction: float) -> None:
    """Raise :class:`CodecOptionError` unless ``fraction`` is in (0, 1]."""
    if not is_fraction(fraction):
        raise CodecOptionError(f"{cls.name} fraction must be in (0, 1], got {fraction}")
