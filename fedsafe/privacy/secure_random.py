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

Gaussian noise. Box-Muller (Box and Muller 1958), vectorised in float64 (torch's SLEEF
kernels for log, sine and cosine, within 1 ulp; numpy for draws of at most
:data:`SMALL_DRAW` values), computed in cache-sized blocks in reused buffers, and
for DP-SGD added to the clipped sums block by block while each block is in the cache
(:meth:`ChaCha20Random.polar_blocks`, used by ``fedsafe.training.secure_dp_sgd.
snapped_noised_grads``; or :meth:`ChaCha20Random.add_standard_normal_` into a float64
buffer): at every step this is most of the cost of private noise. The
radius uses a 106-bit uniform ``u1`` in ``(0, 1]`` (smallest value ``2**-107``), the angle a
53-bit uniform, so the sampler reaches
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
from collections.abc import Iterator
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

PAIRS_PER_BLOCK = 32_768
"""Gaussian pairs per block of the keystream (see :meth:`ChaCha20Random.standard_normal`)."""

SMALL_DRAW = 4096
"""Up to this many values, Gaussians are drawn with numpy (less fixed cost per call)."""

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

    __slots__ = ("_encryptor", "_out", "_used", "_words", "_zeros", "stream")

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
        self._words: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._zeros = b""  # immutable zeros, the plaintext of _fill (grown on demand)
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
        The result is a new array (a copy of :meth:`standard_normal_scratch`).

        Keystream layout: the ``(n + 1) // 2`` pairs are drawn in blocks of
        :data:`PAIRS_PER_BLOCK` (the last one shorter); a block of ``b`` pairs reads ``3 * b``
        little-endian 64-bit words: the radius's high 53 bits of every pair, then its low 53
        bits, then the angle's 53 bits (each word's top 53 bits). Value ``i`` of the result is
        the cosine half of pair ``i`` for ``i < (n + 1) // 2``, the sine half of pair
        ``i - (n + 1) // 2`` after it.
        """
        if n <= SMALL_DRAW:
            return self._small_normal(n)
        return self.standard_normal_scratch(n).numpy().copy()

    def _small_normal(self, n: int) -> NDArray[np.float64]:
        """:meth:`standard_normal` for ``n <= SMALL_DRAW`` (one block) in numpy float64.

        The same keystream words and formulas as the block path (the values agree to the last
        ulps of log, sin and cos); numpy's per-call cost is lower than torch's on tiny arrays.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pairs = (n + 1) // 2
        words = self.uint64(3 * pairs) >> np.uint64(11)
        high, low, angle = words.view(np.int64).astype(np.float64).reshape(3, pairs)
        u1 = low
        u1 += 0.5
        u1 *= _TWO_POW_M53  # in (0, 1)
        u1 += high
        u1 *= _TWO_POW_M53  # in (0, 1], never 0
        radius = np.sqrt(-2.0 * np.log(u1))
        angle *= 2.0 * math.pi * _TWO_POW_M53  # in [0, 2 pi)
        out = np.empty(2 * pairs, dtype=np.float64)
        np.multiply(radius, np.cos(angle), out=out[:pairs])
        np.multiply(radius, np.sin(angle), out=out[pairs:])
        return out[:n]

    def standard_normal_scratch(self, n: int) -> torch.Tensor:
        """The same draws as :meth:`standard_normal`, as a float64 view of a reused buffer.

        The returned tensor (shape ``(n,)``, CPU, contiguous) is valid until the next call on
        this generator, which overwrites it: copy it or consume it first. Reusing the buffers
        spares the page faults of fresh multi-megabyte arrays at every DP-SGD step.
        """
        if n <= SMALL_DRAW:
            return torch.from_numpy(self._small_normal(n))
        if self._out is None or self._out.numel() < n:
            self._out = torch.empty(n, dtype=torch.float64)
        out = self._out[:n]
        for first, last, radius, cosines, sines in self.polar_blocks(n):
            torch.mul(radius, cosines, out=out[first:last])
            rest = (n + 1) // 2
            size = min(last, n - rest) - first
            if size > 0:
                torch.mul(radius[:size], sines[:size], out=out[rest + first : rest + first + size])
        return out

    def add_standard_normal_(self, target: torch.Tensor, scale: float) -> torch.Tensor:
        """Add ``scale`` times the next ``target.numel()`` standard Gaussians to ``target``.

        The Gaussians are those :meth:`standard_normal` would return, in ``target``'s logical
        (row-major) order. On a large contiguous float64 CPU ``target`` they are added block
        by block without being stored (one fused multiply-add per value, so a value may
        differ from ``scale * z`` by a rounding); otherwise they are drawn on the CPU and
        copied to ``target``'s device once.

        Returns
        -------
        torch.Tensor
            ``target``, modified in place.
        """
        n = target.numel()
        fused = target.device.type == "cpu" and target.dtype == torch.float64
        if n <= SMALL_DRAW or not (fused and target.is_contiguous()):
            draws = self.standard_normal_scratch(n).to(target.device).view(target.shape)
            return target.add_(draws, alpha=scale)
        flat = target.view(-1)
        rest = (n + 1) // 2
        for first, last, radius, cosines, sines in self.polar_blocks(n):
            flat[first:last].addcmul_(radius, cosines, value=scale)
            size = min(last, n - rest) - first
            if size > 0:
                flat[rest + first : rest + first + size].addcmul_(
                    radius[:size], sines[:size], value=scale
                )
        return target

    def polar_blocks(
        self, n: int
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Box-Muller for ``n`` Gaussians, by blocks of at most :data:`PAIRS_PER_BLOCK` pairs.

        Yields ``(first, last, radius, cosines, sines)`` for the pairs ``first:last`` of the
        ``(n + 1) // 2``: value ``i`` of the draws is ``radius * cosines`` of pair ``i`` for
        ``i < (n + 1) // 2`` and ``radius * sines`` of pair ``i - (n + 1) // 2`` after it.
        The tensors live in reused buffers, overwritten by the next block (consume each block
        before asking for the next). Blocks keep every pass of the arithmetic within the
        CPU's cache. Each block reads the next ``24 (last - first)`` keystream bytes, laid out
        as :meth:`standard_normal` documents.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pairs = (n + 1) // 2
        for first in range(0, pairs, PAIRS_PER_BLOCK):
            last = min(first + PAIRS_PER_BLOCK, pairs)
            yield (first, last, *self._polar(last - first))

    def _polar(self, pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block of Box-Muller: ``pairs`` radii, cosines and sines (3 * 8 * pairs bytes)."""
        words = self._scratch(3 * pairs)
        self._fill(words)
        # Three 53-bit integers per pair (the top 53 bits of each 64-bit word: numpy's
        # logical shift of the unsigned view), exact in float64: two make the radius's
        # uniform, one the angle's.
        unsigned = words.numpy().view(np.uint64)
        np.right_shift(unsigned, np.uint64(11), out=unsigned)  # a logical shift: no mask
        floats = words.view(torch.float64)
        floats.copy_(words)  # in place, word by word (same size): exact, each is < 2**53
        high, low, angle = floats.view(3, pairs)
        # u1 = (high + (low + 0.5) 2**-53) 2**-53: the products by powers of two are exact,
        # so adding the scaled low part in one call gives the same bits as scaling it first.
        u1 = torch.add(high, low.add_(0.5), alpha=_TWO_POW_M53, out=low)
        u1.mul_(_TWO_POW_M53)  # in (0, 1], never 0: 106 bits of resolution near 0
        radius = torch.log(u1, out=high).mul_(-2.0).sqrt_()
        angle.mul_(2.0 * math.pi * _TWO_POW_M53)  # in [0, 2 pi)
        # torch's vectorised float64 log, sin and cos (SLEEF, within 1 ulp), in place; the
        # cosines go where the radius's low bits were, next to the sines.
        cosines = torch.cos(angle, out=low)
        return radius, cosines, angle.sin_()

    def _scratch(self, n_words: int) -> torch.Tensor:
        """A reused ``int64`` buffer of ``n_words`` values (grown on demand)."""
        if self._words is None or self._words.numel() < n_words:
            self._words = torch.empty(n_words, dtype=torch.int64)
        return self._words[:n_words]

    def _fill(self, words: torch.Tensor) -> None:
        """Overwrite the contiguous CPU tensor ``words`` with the next keystream bytes."""
        num_bytes = words.numel() * words.element_size()
        if self._used + num_bytes > _MAX_STREAM_BYTES:
            raise RuntimeError("ChaCha20 stream exhausted (256 GiB); use a new key")
        self._used += num_bytes
        raw = memoryview(words.numpy().view(np.uint8))  # type: ignore[arg-type]
        if len(self._zeros) < num_bytes:
            self._zeros = bytes(num_bytes)
        # The keystream XOR an immutable buffer of zeros, written into words: no zeroing pass.
        self._encryptor.update_into(memoryview(self._zeros)[:num_bytes], raw)

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
