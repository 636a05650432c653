"""The secret generator: ChaCha20 keystream, exact Bernoulli, Box-Muller, grid snapping.

Statistical tests use explicit keys, so they are deterministic (no flaky p-values); what they
check holds for any key.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from fedsafe.privacy.secure_random import (
    GRID_BITS,
    KEY_BYTES,
    NOISE_STREAM,
    PAIRS_PER_BLOCK,
    SAMPLING_STREAM,
    SMALL_DRAW,
    ChaCha20Random,
    bernoulli_threshold,
    fresh_key,
    noise_grid,
    realised_rate,
    reproducible_key,
    snap_to_grid,
)

KEY = bytes.fromhex("8f3a" * 16)
# Equal to KEY in its low 32 bits read either way (first and last four bytes), different
# elsewhere: torch's Mersenne Twister would give both the same stream.
KEY_LOW32 = KEY[:4] + bytes(b ^ 0x5C for b in KEY[4:28]) + KEY[28:]
# Equal to KEY in 31 of its 32 bytes.
KEY_ONE_BYTE = KEY[:-1] + bytes([KEY[-1] ^ 1])


def test_chacha20_matches_the_rfc_8439_test_vector() -> None:
    # RFC 8439 A.1 test vector 1: all-zero key and nonce, block counter 0.
    block = ChaCha20Random(bytes(32), stream=0).keystream(16)
    assert block.hex() == "76b8e0ada0f13d90405d6ae55386bd28"


def test_key_is_validated_on_creation() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        ChaCha20Random(bytes(16))
    with pytest.raises(ValueError, match="32 bytes"):
        ChaCha20Random(bytes(33))
    with pytest.raises(TypeError, match="32 bytes"):
        ChaCha20Random(12345)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream"):
        ChaCha20Random(KEY, stream=-1)
    with pytest.raises(ValueError, match="stream"):
        ChaCha20Random(KEY, stream=2**96)


def test_the_key_never_shows_in_repr() -> None:
    rng = ChaCha20Random(KEY, NOISE_STREAM)
    assert KEY.hex()[:8] not in repr(rng)
    assert not any(isinstance(getattr(rng, a, None), bytes) for a in ("key", "_key"))


def test_default_key_is_fresh_and_256_bits() -> None:
    assert len(fresh_key()) == KEY_BYTES
    assert fresh_key() != fresh_key()
    assert not np.array_equal(ChaCha20Random().uint64(4), ChaCha20Random().uint64(4))


def test_an_explicit_key_replays_and_streams_are_separate() -> None:
    a = ChaCha20Random(KEY, SAMPLING_STREAM).uint64(1000)
    assert np.array_equal(a, ChaCha20Random(KEY, SAMPLING_STREAM).uint64(1000))
    b = ChaCha20Random(KEY, NOISE_STREAM).uint64(1000)
    assert len(np.intersect1d(a, b)) == 0


def test_reading_in_pieces_continues_the_stream() -> None:
    whole = ChaCha20Random(KEY).keystream(200)
    rng = ChaCha20Random(KEY)
    assert rng.keystream(7) + rng.keystream(193) == whole


def test_reproducible_key_is_32_bytes_and_depends_on_every_part() -> None:
    k = reproducible_key(1, "site", 3)
    assert len(k) == KEY_BYTES and k == reproducible_key(1, "site", 3)
    assert k != reproducible_key(1, "site", 4)


@pytest.mark.parametrize("other", [KEY_LOW32, KEY_ONE_BYTE], ids=["low-32-bits", "31-bytes"])
def test_keys_sharing_bits_give_unrelated_noise(other: bytes) -> None:
    n = 200_000
    z1 = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(n)
    z2 = ChaCha20Random(other, NOISE_STREAM).standard_normal(n)
    # Independent streams: the sample correlation is about N(0, 1/n); 5 sigma.
    assert abs(np.corrcoef(z1, z2)[0, 1]) < 5 / math.sqrt(n)
    w1 = ChaCha20Random(KEY, NOISE_STREAM).uint64(10_000)
    w2 = ChaCha20Random(other, NOISE_STREAM).uint64(10_000)
    assert len(np.intersect1d(w1, w2)) == 0


@pytest.mark.parametrize("other", [KEY_LOW32, KEY_ONE_BYTE], ids=["low-32-bits", "31-bytes"])
def test_keys_sharing_bits_give_unrelated_sampling(other: bytes) -> None:
    q, n = 0.3, 200_000
    m1 = ChaCha20Random(KEY, SAMPLING_STREAM).bernoulli(q, n)
    m2 = ChaCha20Random(other, SAMPLING_STREAM).bernoulli(q, n)
    # Independent masks agree with probability q^2 + (1-q)^2.
    agree = int(np.sum(m1 == m2))
    assert stats.binomtest(agree, n, q * q + (1 - q) ** 2).pvalue > 1e-3


def test_torch_mersenne_twister_collides_where_chacha20_does_not() -> None:
    # The flaw being fixed: torch's CPU generator keeps the low 32 bits of its seed.
    seed = 0x1234_5678_9ABC
    a = torch.rand(8, generator=torch.Generator().manual_seed(seed))
    b = torch.rand(8, generator=torch.Generator().manual_seed(seed + 2**32))
    assert torch.equal(a, b)
    key_a, key_b = seed.to_bytes(32, "little"), (seed + 2**32).to_bytes(32, "little")
    assert not np.array_equal(ChaCha20Random(key_a).uint64(8), ChaCha20Random(key_b).uint64(8))


def test_standard_normal_passes_normality_tests_with_unit_std() -> None:
    n = 400_000
    z = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(n)
    assert z.shape == (n,) and z.dtype == np.float64
    assert stats.normaltest(z).pvalue > 1e-3  # D'Agostino-Pearson: skewness and kurtosis
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    assert np.all(np.isfinite(z)) and np.abs(z).max() <= 12.19


def test_standard_normal_odd_and_empty_sizes() -> None:
    rng = ChaCha20Random(KEY)
    assert rng.standard_normal(0).shape == (0,)
    assert rng.standard_normal(7).shape == (7,)


def _reference_normals(words: np.ndarray, n: int) -> np.ndarray:
    """The documented keystream layout, in plain numpy float64 (blocks of 3 x b words)."""
    pairs = (n + 1) // 2
    cos_half, sin_half, start = [], [], 0
    for first in range(0, pairs, PAIRS_PER_BLOCK):
        b = min(PAIRS_PER_BLOCK, pairs - first)
        block = (words[start : start + 3 * b] >> np.uint64(11)).astype(np.float64)
        high, low, angle = block.reshape(3, b)
        u1 = ((low + 0.5) * 2.0**-53 + high) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log(u1))
        theta = angle * (2.0 * math.pi * 2.0**-53)
        cos_half.append(radius * np.cos(theta))
        sin_half.append(radius * np.sin(theta))
        start += 3 * b
    return np.concatenate(cos_half + sin_half)[:n]


@pytest.mark.parametrize("n", [1, 6, 2 * PAIRS_PER_BLOCK + 5, 4 * PAIRS_PER_BLOCK + 1])
def test_standard_normal_follows_the_documented_keystream_layout(n: int) -> None:
    # Several blocks, a short last block and an odd count: the same values as Box-Muller on
    # the raw keystream words laid out as the docstring says (up to the last ulps of log,
    # sin and cos).
    z = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(n)
    words = ChaCha20Random(KEY, NOISE_STREAM).uint64(3 * ((n + 1) // 2))
    np.testing.assert_allclose(z, _reference_normals(words, n), rtol=1e-12, atol=1e-14)


def test_add_standard_normal_adds_the_same_draws_in_place() -> None:
    n, scale = 2 * PAIRS_PER_BLOCK + 3, 2.5
    base = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    target = base.clone()
    out = ChaCha20Random(KEY, NOISE_STREAM).add_standard_normal_(target, scale)
    assert out is target
    z = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(n)
    np.testing.assert_allclose(target.numpy(), base.numpy() + scale * z, rtol=0, atol=1e-13)
    # A float32 target takes the draw-then-add path: the same draws, rounded to float32.
    small = torch.zeros(7, dtype=torch.float32)
    ChaCha20Random(KEY, NOISE_STREAM).add_standard_normal_(small, 1.0)
    want = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(7).astype(np.float32)
    assert np.array_equal(small.numpy(), want)
    # A non-contiguous target gets the draws in its logical (row-major) order.
    big = torch.zeros(2 * PAIRS_PER_BLOCK, 3, dtype=torch.float64).t()
    ChaCha20Random(KEY, NOISE_STREAM).add_standard_normal_(big, 1.0)
    want64 = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(big.numel())
    assert np.array_equal(big.contiguous().numpy().ravel(), want64)


def test_standard_normal_scratch_is_reused_and_continues_the_stream() -> None:
    n = 2 * PAIRS_PER_BLOCK + 1  # above the numpy path for small draws
    rng = ChaCha20Random(KEY, NOISE_STREAM)
    first = rng.standard_normal_scratch(n)
    copy = first.clone()
    second = rng.standard_normal_scratch(n)  # overwrites the first (documented)
    assert first.data_ptr() == second.data_ptr() and not torch.equal(copy, second)
    expected = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(n)
    assert np.array_equal(copy.numpy(), expected)
    # Small draws (the numpy path) follow the same layout.
    small = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(6)
    words = ChaCha20Random(KEY, NOISE_STREAM).uint64(9)
    np.testing.assert_allclose(small, _reference_normals(words, 6), rtol=1e-12, atol=1e-14)


def test_bernoulli_threshold_is_exact() -> None:
    assert bernoulli_threshold(0.5) == 2**63
    assert bernoulli_threshold(1.0) == 2**64
    assert bernoulli_threshold(0.0) == 0
    assert bernoulli_threshold(2.0**-70) == 0
    with pytest.raises(ValueError, match="sample rate"):
        bernoulli_threshold(1.5)
    with pytest.raises(ValueError, match="sample rate"):
        bernoulli_threshold(float("nan"))


@given(st.floats(min_value=0.0, max_value=1.0))
def test_realised_rate_is_never_above_the_accounted_rate(q: float) -> None:
    r = realised_rate(q)
    assert r <= Fraction(q)
    assert Fraction(q) - r < Fraction(1, 2**64)


def test_bernoulli_extremes() -> None:
    rng = ChaCha20Random(KEY)
    assert rng.bernoulli(1.0, 1000).all()
    assert not rng.bernoulli(0.0, 1000).any()


@pytest.mark.parametrize("q", [1 / 3, 0.0123, 0.5])
def test_bernoulli_rate_matches_q_by_a_binomial_test(q: float) -> None:
    n = 500_000
    k = int(ChaCha20Random(KEY, SAMPLING_STREAM).bernoulli(q, n).sum())
    assert stats.binomtest(k, n, q).pvalue > 1e-3


@given(st.floats(min_value=1e-30, max_value=1e30))
def test_noise_grid_is_a_power_of_two_finer_than_std(std: float) -> None:
    g = noise_grid(std)
    mantissa, _ = math.frexp(g)
    assert mantissa == 0.5  # a power of two
    assert std * 2.0 ** -(GRID_BITS + 1) < g <= std * 2.0**-GRID_BITS


def test_noise_grid_rejects_bad_std() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="standard deviation"):
            noise_grid(bad)


def test_snapped_gaussian_lies_on_the_grid_with_the_right_std() -> None:
    std, n = 1.7, 200_000
    base = np.linspace(-3.1, 5.3, n)  # arbitrary, off-grid statistic
    out = ChaCha20Random(KEY, NOISE_STREAM).snapped_gaussian(base, std)
    g = noise_grid(std)
    k = out / g
    assert np.array_equal(k, np.round(k))  # exact multiples of the grid
    noise = out - base
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * n)
    assert stats.normaltest(noise).pvalue > 1e-3
    # Rounding moves each value by at most half a grid step.
    exact = base + ChaCha20Random(KEY, NOISE_STREAM).standard_normal(n) * std
    assert np.abs(out - exact).max() <= g / 2


def test_snap_to_grid_rounds_half_to_even_exactly() -> None:
    g = 2.0**-3
    assert np.array_equal(
        snap_to_grid(np.array([0.0625, 0.1875, -0.0624, 1.0]), g), [0.0, 0.25, -0.0, 1.0]
    )


def _main_block_path(words: torch.Tensor, n: int) -> torch.Tensor:
    """The block path as it was before issue 17's third pass (bk17d), op for op in torch:
    the arithmetic shift and mask, a separate float64 buffer, four passes for the radius's
    uniform. The faster path must give these bits, not merely close values."""
    pairs, start = (n + 1) // 2, 0
    cos_half, sin_half = [], []
    for first in range(0, pairs, PAIRS_PER_BLOCK):
        b = min(PAIRS_PER_BLOCK, pairs - first)
        block = words[start : start + 3 * b].clone()
        block.bitwise_right_shift_(11).bitwise_and_(2**53 - 1)
        floats = block.to(torch.float64)
        high, low, angle = floats.view(3, b)
        u1 = low.add_(0.5).mul_(2.0**-53)
        u1.add_(high).mul_(2.0**-53)
        radius = torch.log(u1).mul_(-2.0).sqrt_()
        angle.mul_(2.0 * math.pi * 2.0**-53)
        cos_half.append(radius * torch.cos(angle))
        sin_half.append(radius * torch.sin(angle))
        start += 3 * b
    return torch.cat(cos_half + sin_half)[:n]


@pytest.mark.parametrize("n", [SMALL_DRAW + 1, 2 * PAIRS_PER_BLOCK + 5, 3 * PAIRS_PER_BLOCK])
def test_block_path_gives_the_bits_of_the_previous_formulas(n: int) -> None:
    # Issue 17 (bk17d): the keystream XORs an immutable zero buffer instead of a zeroed one,
    # numpy's logical shift replaces the shift and mask, the words become floats in place,
    # and the radius's uniform takes three passes: the draws must not change by one bit.
    rng = ChaCha20Random(KEY, NOISE_STREAM)
    first = rng.standard_normal_scratch(n).clone()
    second = rng.standard_normal_scratch(n).clone()  # reused buffers, the stream continued
    words = torch.from_numpy(
        ChaCha20Random(KEY, NOISE_STREAM).uint64(6 * ((n + 1) // 2)).view(np.int64).copy()
    )
    half = 3 * ((n + 1) // 2)
    assert torch.equal(first, _main_block_path(words[:half], n))
    assert torch.equal(second, _main_block_path(words[half:], n))
