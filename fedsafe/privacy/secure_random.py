"""Secret randomness for DP-SGD: a ChaCha20 keystream, exact Bernoulli tests, snapped Gaussians.

The DP guarantee of a site holds only if nobody else can predict its batch sampling or its
noise: whoever can regenerate the noise subtracts it from a released update. Torch's and
numpy's default generators (Mersenne Twister, Philox) have seeds of 64 bits at most, and
torch's CPU Mersenne Twister keeps only the low 32 bits, so a released update identifies the
seed by search. This module draws everything from a ChaCha20 keystream (Bernstein 2008;
RFC 8439) computed by the ``cryptography`` package (OpenSSL), keyed with 256 bits from
:func:`os.urandom` unless the caller passes a key. A key is passed only for runs the site
itself declares "not private" (reproducible simulation); normal use never passes one.

Streams. One key drives several independent streams, told apart by the ChaCha20 nonce
(:data:`SAMPLING_STREAM`, :data:`NOISE_STREAM`): the sampling never shares keystream bytes
with the noise.

Bernoulli sampling. ``bernoulli(q, n)`` compares uniform 64-bit integers with the integer
threshold ``T = floor(q * 2**64)``: the realised inclusion rate is exactly ``T / 2**64 <= q``
(:func:`realised_rate`), so accounting with ``q`` is never below the truth.

Gaussian noise. Box-Muller (Box and Muller 1958), vectorised in float64 (numpy; sine and
cosine by torch's vectorised kernels, within 1 ulp). The radius uses a 106-bit uniform ``u1``
in ``(0, 1]`` (smallest value ``2**-107``), the angle a 53-bit uniform, so the sampler reaches
12.18 standard deviations (the ideal Gaussian puts less than ``1e-32`` beyond that) and the
values it can produce lie far closer together than the grid below (the radius's spacing is at
most about ``2**-26`` standard deviations, near zero, and the angle's ``2**-53`` of a turn).

Floating-point attacks (Mironov, "On significance of the least significant bits for
differential privacy", CCS 2012; Holohan and Braghin, "Secure random sampling in differential
privacy", ESORICS 2021; Jin et al., "Are we there yet? Timing and floating-point attacks on
differential privacy systems", IEEE S&P 2022). A floating-point sampler produces only a sparse,
irregular set of values; the float sum ``s + z`` of a statistic and such a noise value then
tells an observer which candidate ``s`` is consistent with it, whatever the noise's standard
deviation. The defence here is Mironov's snapping idea applied to the Gaussian, at the cost of
one draw per value (Opacus's ``secure_mode`` draws four and sums them): the released value is
``round((s + z) / g) * g``, computed in float64, on the power-of-two grid
``g = 2**(floor(log2(std)) - GRID_BITS)``, so ``std * 2**-11 < g <= std * 2**-10``
(:func:`noise_grid`, :func:`snap_to_grid`); everything after it (the cast to the parameter's
dtype, the division by the batch size, the optimizer step) is post-processing.

What it defends: the attack above. Every released value is an exact multiple of ``g`` whatever
the records are, so the low-order bits of the float sum, where a sampler's gaps show, are never
released; which grid point is released depends only on which grid cell ``s + z`` falls in, and
because the sampler's values are spaced thousands of times finer than ``g``, the probability of
each cell is close to that of the ideal (real-valued) Gaussian. Rounding the ideal Gaussian
mechanism's output is post-processing, so the accounted (epsilon, delta) is the one of the
ideal mechanism.

What it does not defend, and is not added to the ledger: the remaining gap between the
sampler's cell probabilities and the ideal ones (small, but this module gives no formal bound,
as Opacus gives none for its four-draw defence); the ideal Gaussian mass beyond 12.18 standard
deviations; floating-point error in Opacus's per-record clipping (float32 norms, a relative
excess of the sensitivity of order ``1e-7``); timing side channels (a round's duration depends
on the Poisson batch sizes); the coordinator's code itself (the ClientApp must be code the site
approved); anyone who learns the key (an explicit key, or the site's memory).
"""

from __future__ import annotations

import hashlib
import math
import os
from fractions import Fraction

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

KEY_BYTES = 32
"""ChaCha20 key length: 256 bits."""

SAMPLING_STREAM = 1
"""Stream (nonce) of the Poisson batch sampling."""

NOISE_STREAM = 2
"""Stream (nonce) of the Gaussian noise."""

GRID_BITS = 10
"""The noise grid is a power of two in ``(std * 2**-(GRID_BITS+1), std * 2**-GRID_BITS]``."""

_NONCE_BYTES = 12
_MAX_STREAM_BYTES = 64 * 2**32  # the 32-bit ChaCha20 block counter of RFC 8439
_TWO_POW_M53 = 2.0**-53


def fresh_key() -> bytes:
    """A secret 256-bit key from the operating system (:func:`os.urandom`)."""
    return os.urandom(KEY_BYTES)


def reproducible_key(*parts: int | str) -> bytes:
    """A 32-byte key derived with SHA-256 from public values: NOT PRIVATE.

    Only for runs the site itself declares "not private" (reproducible simulation): anyone who
    knows ``parts`` regenerates the sampling and the noise, which voids the DP guarantee
    against them.
    """
    text = "fedsafe-not-private-key:" + ":".join(str(p) for p in parts)
    return hashlib.sha256(text.encode()).digest()


def bernoulli_threshold(q: float) -> int:
    """``floor(q * 2**64)``, exactly: a uniform 64-bit integer below it has probability <= q.

    Raises
    ------
    ValueError
        If ``q`` is not a finite number in ``[0, 1]``.
    """
    if not (math.isfinite(q) and 0.0 <= q <= 1.0):
        raise ValueError(f"sample rate must be in [0, 1], got {q}")
    # q * 2**64 only changes the exponent of a float64, so it is exact; int() floors it.
    return int(q * 2.0**64)


def realised_rate(q: float) -> Fraction:
    """The exact inclusion probability of :meth:`ChaCha20Random.bernoulli` at rate ``q``."""
    return Fraction(bernoulli_threshold(q), 2**64)


def noise_grid(std: float) -> float:
    """The power-of-two grid the noised values are rounded to, for noise of ``std``.

    Returns ``2**(floor(log2(std)) - GRID_BITS)``: finer than ``std`` by a factor between
    ``2**GRID_BITS`` and ``2**(GRID_BITS + 1)``.

    Raises
    ------
    ValueError
        If ``std`` is not finite and > 0.
    """
    if not (math.isfinite(std) and std > 0.0):
        raise ValueError(f"noise standard deviation must be finite and > 0, got {std}")
    _, exponent = math.frexp(std)  # std = m * 2**exponent with m in [0.5, 1)
    return math.ldexp(1.0, exponent - 1 - GRID_BITS)


def snap_to_grid(values: NDArray[np.float64], grid: float) -> NDArray[np.float64]:
    """Round float64 ``values`` to the nearest multiple of the power-of-two ``grid``.

    Ties go to the even multiple (IEEE round-half-even). Dividing and multiplying by a power of
    two is exact, so the result is exactly ``k * grid`` for an integer ``k``.
    """
    return np.rint(np.asarray(values, dtype=np.float64) / grid) * grid


class ChaCha20Random:
    """A cryptographically secure generator: one ChaCha20 keystream, read in order.

    Parameters
    ----------
    key
        32 bytes. ``None`` (normal use) takes a fresh secret key from :func:`os.urandom`. An
        explicit key makes the output reproducible by whoever knows it: only for runs the site
        declares "not private".
    stream
        Which of the key's independent streams to read (the 96-bit nonce), in ``[0, 2**96)``.

    Raises
    ------
    TypeError
        If ``key`` is not bytes.
    ValueError
        If ``key`` is not 32 bytes long or ``stream`` is out of range.

    Notes
    -----
    The key is not kept as an attribute and never appears in ``repr``. One stream yields at
    most 256 GiB (the RFC 8439 block counter); reading past it raises ``RuntimeError``.
    """

    __slots__ = ("_encryptor", "_used", "stream")

    def __init__(self, key: bytes | None = None, stream: int = 0) -> None:
        if key is None:
            key = fresh_key()
        if not isinstance(key, bytes | bytearray):
            raise TypeError(f"key must be {KEY_BYTES} bytes, got {type(key).__name__}")
        if len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes (256 bits), got {len(key)} bytes")
        if not (isinstance(stream, int) and 0 <= stream < 2 ** (8 * _NONCE_BYTES)):
            raise ValueError(f"stream must be an int in [0, 2**96), got {stream!r}")
        # cryptography's 16-byte ChaCha20 nonce: a 32-bit little-endian block counter (0),
        # then the 96-bit RFC 8439 nonce, which names the stream.
        nonce = bytes(4) + stream.to_bytes(_NONCE_BYTES, "little")
        self._encryptor = Cipher(algorithms.ChaCha20(bytes(key), nonce), mode=None).encryptor()
        self._used = 0
        self.stream = stream

    def __repr__(self) -> str:
        return f"ChaCha20Random(stream={self.stream}, bytes_used={self._used})"

    def keystream(self, num_bytes: int) -> bytes:
        """The next ``num_bytes`` bytes of the keystream."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        if self._used + num_bytes > _MAX_STREAM_BYTES:
            raise RuntimeError("ChaCha20 stream exhausted (256 GiB); use a new key")
        self._used += num_bytes
        return self._encryptor.update(bytes(num_bytes))

    def uint64(self, n: int) -> NDArray[np.uint64]:
        """``n`` independent uniform integers in ``[0, 2**64)``, shape ``(n,)``.

        The keystream is written in place into a zeroed array (little-endian words), which
        avoids the copies of :meth:`keystream`.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self._used + 8 * n > _MAX_STREAM_BYTES:
            raise RuntimeError("ChaCha20 stream exhausted (256 GiB); use a new key")
        self._used += 8 * n
        words = np.zeros(n, dtype="<u8")
        raw = words.view(np.uint8)
        view = memoryview(raw)  # type: ignore[arg-type]
        self._encryptor.update_into(view, view)  # keystream XOR zeros, in place
        return words.astype(np.uint64, copy=False)

    def bernoulli(self, q: float, n: int) -> NDArray[np.bool_]:
        """``n`` independent Bernoulli draws at rate ``q``, shape ``(n,)``.

        Each is True with probability exactly ``floor(q * 2**64) / 2**64`` (<= ``q``; see
        :func:`realised_rate`).
        """
        threshold = bernoulli_threshold(q)
        draws = self.uint64(n)
        if threshold == 0:
            return np.zeros(n, dtype=np.bool_)
        return draws <= np.uint64(threshold - 1)

    def standard_normal(self, n: int) -> NDArray[np.float64]:
        """``n`` independent standard Gaussians (Box-Muller, float64), shape ``(n,)``.

        Each pair uses 24 keystream bytes: a 106-bit uniform for the radius and a 53-bit one
        for the angle; see the module notes for the resolution and the reach of the tail.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pairs = (n + 1) // 2
        # Three 53-bit integers per pair, exact in float64 (the signed conversion is the fast
        # one): two make the radius's uniform, one the angle's.
        words = self.uint64(3 * pairs) >> np.uint64(11)
        high, low, angle = words.view(np.int64).astype(np.float64).reshape(3, pairs)
        u1 = low
        u1 += 0.5
        u1 *= _TWO_POW_M53  # in (0, 1)
        u1 += high
        u1 *= _TWO_POW_M53  # in (0, 1], never 0: 106 bits of resolution near 0
        radius = np.sqrt(-2.0 * np.log(u1))
        angle *= 2.0 * math.pi * _TWO_POW_M53  # in [0, 2 pi)
        # torch's vectorised float64 sin/cos (SLEEF, within 1 ulp) are many times faster than
        # numpy's here; the values are the same to the last bit or so.
        theta = torch.from_numpy(angle)
        out = np.empty(2 * pairs, dtype=np.float64)
        np.multiply(radius, torch.cos(theta).numpy(), out=out[:pairs])
        np.multiply(radius, torch.sin(theta).numpy(), out=out[pairs:])
        return out[:n]

    def snapped_gaussian(self, values: NDArray[np.float64], std: float) -> NDArray[np.float64]:
        """``values`` plus Gaussian noise of ``std``, rounded to :func:`noise_grid` ``(std)``.

        This is the released form of a noised statistic (the floating-point defence of the
        module notes); it costs one Gaussian draw per value.
        """
        grid = noise_grid(std)
        base = np.asarray(values, dtype=np.float64)
        out = self.standard_normal(base.size).reshape(base.shape)
        out *= std
        out += base
        out /= grid
        np.rint(out, out=out)
        out *= grid
        return out
