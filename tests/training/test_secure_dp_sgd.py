"""Opacus with secret randomness: the ChaCha20 Poisson sampler and the noise override."""

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsafe.privacy.secure_random import (
    NOISE_STREAM,
    PAIRS_PER_BLOCK,
    SAMPLING_STREAM,
    SMALL_DRAW,
    ChaCha20Random,
    noise_grid,
    realised_rate,
)
from fedsafe.training.dp_training import make_private, private_backward
from fedsafe.training.secure_dp_sgd import (
    SecureNoiseDPOptimizer,
    SecureNoiseGhostDPOptimizer,
    SecurePoissonSampler,
    snap_noised_sums_,
    snapped_noised_grads,
)

# Opacus per-sample hooks on inputs that need no gradient: harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

KEY = bytes.fromhex("5e" * 32)
KEY_LOW32 = KEY[:4] + bytes(b ^ 0xA7 for b in KEY[4:28]) + KEY[28:]


def _loader(n: int = 200, d: int = 6, batch_size: int = 10) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _private(key: bytes | None, noise_multiplier: float = 1.0, **kw: int):
    model = nn.Linear(6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, *make_private(model, opt, _loader(**kw), noise_multiplier, 1.0, key)


def test_sampler_inclusion_rate_matches_the_accounted_rate() -> None:
    _, dp_model, _, loader, rate = _private(KEY, n=300, batch_size=20)
    sampler = loader.batch_sampler
    assert isinstance(sampler, SecurePoissonSampler)
    assert rate == sampler.sample_rate == pytest.approx(1 / 15)
    assert realised_rate(rate) <= Fraction(rate)  # the ledger's rate is never below the truth
    included, trials = 0, 0
    for _ in range(40):  # 40 passes of 15 batches continue one stream
        for batch in sampler:
            assert batch == sorted(set(batch)) and all(0 <= i < 300 for i in batch)
            included += len(batch)
            trials += 300
    assert stats.binomtest(included, trials, rate).pvalue > 1e-3
    dp_model._close()


def test_sampler_batches_vary_in_size_like_poisson_sampling() -> None:
    # Poisson sampling: batch sizes are Binomial(n, q), not fixed.
    sampler = SecurePoissonSampler(1000, 0.05, 2000, ChaCha20Random(KEY, SAMPLING_STREAM))
    sizes = np.array([len(b) for b in sampler])
    assert abs(sizes.mean() - 50) < 5 * math.sqrt(1000 * 0.05 * 0.95 / 2000)
    assert abs(sizes.var() / (1000 * 0.05 * 0.95) - 1) < 0.1


def test_sampler_validates() -> None:
    rng = ChaCha20Random(KEY)
    with pytest.raises(ValueError, match="sample_rate"):
        SecurePoissonSampler(10, 0.0, 1, rng)
    with pytest.raises(ValueError, match="steps"):
        SecurePoissonSampler(10, 0.5, 0, rng)
    with pytest.raises(ValueError, match="num_records"):
        SecurePoissonSampler(0, 0.5, 1, rng)


def test_keys_equal_in_low_32_bits_sample_unrelated_batches() -> None:
    n, q, steps = 500, 0.2, 400
    masks = []
    for key in (KEY, KEY_LOW32):
        sampler = SecurePoissonSampler(n, q, steps, ChaCha20Random(key, SAMPLING_STREAM))
        m = np.zeros((steps, n), dtype=bool)
        for t, batch in enumerate(sampler):
            m[t, batch] = True
        masks.append(m)
    agree = int(np.sum(masks[0] == masks[1]))
    assert stats.binomtest(agree, n * steps, q * q + (1 - q) ** 2).pvalue > 1e-3


def test_make_private_builds_the_secure_optimizer_without_opacus_rng_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, dp_model, opt, loader, _ = _private(None)
    assert type(opt) is SecureNoiseDPOptimizer
    assert type(opt).add_noise is SecureNoiseDPOptimizer.add_noise
    assert opt.generator is None and not opt.secure_mode
    assert not [w for w in caught if "Secure RNG" in str(w.message)]
    dp_model._close()


def test_fresh_keys_give_different_batches() -> None:
    firsts = []
    for _ in range(2):
        _, dp_model, _, loader, _ = _private(None)
        firsts.append([tuple(b) for b in loader.batch_sampler])
        dp_model._close()
    assert firsts[0] != firsts[1]


def _noised_grads(key: bytes, noise_multiplier: float) -> tuple[list[torch.Tensor], float]:
    """One clip-and-noise step by hand: the gradient sums after ``add_noise``."""
    _, dp_model, opt, loader, _ = _private(key, noise_multiplier)
    xb, yb = next(b for b in loader if len(b[0]) > 0)
    nn.functional.cross_entropy(dp_model(xb), yb).backward()
    opt.clip_and_accumulate()
    opt.add_noise()
    grads = [p.grad.detach().clone() for p in opt.params]
    dp_model._close()
    return grads, noise_grid(noise_multiplier * 1.0)


def test_noised_sums_lie_on_the_noise_grid() -> None:
    grads, g = _noised_grads(KEY, 1.3)
    for grad in grads:
        k = grad.double() / g
        assert torch.equal(k, torch.round(k))


def test_noise_comes_from_the_noise_stream_with_std_sigma_c() -> None:
    # With sigma * C = 500 the clipped sum (norm <= batch * C) is small next to the noise.
    sigma = 500.0
    grads, g = _noised_grads(KEY, sigma)
    flat = torch.cat([x.flatten() for x in grads]).double().numpy()
    # One draw for all parameters per step, in the optimizer's order.
    expected = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(flat.size) * sigma
    assert np.abs(flat - expected).max() < 40  # clipped sum of <= ~30 records, C = 1


def test_secure_optimizer_rejects_zero_noise() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        SecureNoiseDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            noise_rng=ChaCha20Random(KEY),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_reaches_cuda_parameters_on_the_grid() -> None:
    cuda = torch.device("cuda")
    model = nn.Linear(6, 2).to(cuda)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_opt, loader, _ = make_private(model, opt, _loader(), 2.0, 1.0, KEY)
    xb, yb = next(b for b in loader if len(b[0]) > 0)
    nn.functional.cross_entropy(dp_model(xb.to(cuda)), yb.to(cuda)).backward()
    dp_opt.clip_and_accumulate()
    dp_opt.add_noise()
    g = noise_grid(2.0)
    for p in dp_opt.params:
        assert p.grad.device.type == "cuda"
        k = p.grad.double() / g
        assert torch.equal(k, torch.round(k))
    dp_model._close()


def test_a_refused_key_leaves_the_model_without_hooks() -> None:
    model = nn.Linear(6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="32 bytes"):
        make_private(model, opt, _loader(), 1.0, 1.0, bytes(8))
    assert not model._forward_hooks and not model._backward_hooks


def test_expected_batch_size_survives_float_rounding() -> None:
    # 49 * (1 / 49) is 0.999... in floats; Opacus's int() of it would be 0.
    _, dp_model, opt, _, rate = _private(KEY, n=49, batch_size=1)
    assert rate == 1 / 49 and opt.expected_batch_size == 1
    dp_model._close()


def _ghost(key: bytes | None, noise_multiplier: float, sample_rate: float | None = None):
    model = nn.Linear(6, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_private(
        model, opt, _loader(), noise_multiplier, 1.0, key, sample_rate, grad_sample_mode="ghost"
    )


def test_ghost_mode_builds_the_secure_ghost_optimizer() -> None:
    dp_model, opt, loader, _ = _ghost(None, 1.0)
    assert type(opt) is SecureNoiseGhostDPOptimizer
    # The secret-noise override, not Opacus's torch.Generator draw.
    assert type(opt).add_noise is SecureNoiseDPOptimizer.add_noise
    assert opt.generator is None and not opt.secure_mode
    assert isinstance(loader.batch_sampler, SecurePoissonSampler)
    dp_model._close()


def test_ghost_noise_comes_from_the_noise_stream_on_the_grid() -> None:
    sigma = 500.0
    dp_model, opt, loader, _ = _ghost(KEY, sigma)
    xb, yb = next(b for b in loader if len(b[0]) > 0)
    opt.zero_grad(set_to_none=True)
    private_backward(dp_model, opt, xb, yb)
    opt.accumulate()
    opt.add_noise()
    flat = torch.cat([p.grad.detach().flatten() for p in opt.params]).double()
    g = noise_grid(sigma)
    assert torch.equal(flat / g, torch.round(flat / g))
    expected = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(flat.numel()) * sigma
    assert np.abs(flat.numpy() - expected).max() < 40  # clipped sum of <= ~30 records, C = 1
    dp_model._close()


def test_ghost_divides_by_the_public_expected_batch_size() -> None:
    # 200 records sampled at the public rate 1/25: the mean divides by the loader's batch (10),
    # not by 200 / 25 = 8.
    dp_model, opt, _, rate = _ghost(KEY, 1.0, sample_rate=1 / 25)
    assert rate == 1 / 25 and opt.expected_batch_size == 10
    dp_model._close()


def test_ghost_step_on_an_empty_batch_adds_only_noise() -> None:
    dp_model, opt, _, _ = _ghost(KEY, 2.0)
    before = [p.detach().clone() for p in opt.params]
    opt.zero_grad(set_to_none=True)
    private_backward(dp_model, opt, torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    opt.step()
    flat = torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, opt.params, strict=True)]
    ).double()
    # lr 0.1, divided by the expected batch size: the update is the noise alone, finite.
    expected = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(flat.numel()) * 2.0
    scale = 0.1 / opt.expected_batch_size
    assert torch.isfinite(flat).all()
    assert np.allclose(flat.numpy() / scale, expected, atol=noise_grid(2.0))
    # A full batch after the empty one still trains (no stale forward count in the hooks).
    xb, yb = next(iter(DataLoader(_loader().dataset, batch_size=10)))
    opt.zero_grad(set_to_none=True)
    private_backward(dp_model, opt, xb, yb)
    opt.step()
    dp_model._close()


def test_snap_noised_sums_matches_the_per_parameter_float64_formula() -> None:
    gen = torch.Generator().manual_seed(3)  # the clipped sums: test data, not privacy noise
    sums = [torch.randn(70_000, generator=gen) * 4, torch.randn(3, 5, generator=gen)]
    std = 1.3
    g = noise_grid(std)
    k = snap_noised_sums_(sums, ChaCha20Random(KEY, NOISE_STREAM), std, g)
    assert k.dtype == torch.float64 and torch.equal(k, torch.round(k))
    flat = torch.cat([x.reshape(-1) for x in sums]).double().numpy()
    z = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(flat.size)
    reference = np.rint((flat + z * std) / g)
    # Equal but where the fused multiply-add moves a value across a rounding tie.
    assert np.abs(k.numpy() - reference).max() <= 1
    assert (k.numpy() == reference).mean() > 0.9999
    # The buffer of the right size is reused; a wrong size is replaced.
    again = snap_noised_sums_(sums, ChaCha20Random(KEY, NOISE_STREAM), std, g, k)
    assert again.data_ptr() == k.data_ptr()
    other = snap_noised_sums_(sums[1:], ChaCha20Random(KEY), std, g, k)
    assert other.numel() == 15


def test_a_model_above_the_small_draw_takes_the_block_path_with_the_same_noise() -> None:
    # About 98,000 values: two Box-Muller blocks added into the one float64 buffer.
    d = 2 * PAIRS_PER_BLOCK // 6 + 17
    model = nn.Sequential(nn.Linear(6, d), nn.ReLU(), nn.Linear(d, 2))
    total = sum(p.numel() for p in model.parameters())
    assert total > max(SMALL_DRAW, 2 * PAIRS_PER_BLOCK)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sigma = 500.0
    dp_model, dp_opt, loader, _ = make_private(model, opt, _loader(), sigma, 1.0, KEY)
    xb, yb = next(b for b in loader if len(b[0]) > 0)
    nn.functional.cross_entropy(dp_model(xb), yb).backward()
    dp_opt.clip_and_accumulate()
    dp_opt.add_noise()
    flat = torch.cat([p.grad.detach().flatten() for p in dp_opt.params]).double()
    assert all(p.grad.dtype == torch.float32 and p.grad.shape == p.shape for p in dp_opt.params)
    g = noise_grid(sigma)
    assert torch.equal(flat / g, torch.round(flat / g))
    expected = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(total) * sigma
    assert np.abs(flat.numpy() - expected).max() < 40  # clipped sum of <= ~30 records, C = 1
    dp_model._close()


def test_released_gradient_is_exactly_the_snapped_integer_times_the_grid_cast() -> None:
    # add_noise's fused path (snapped_noised_grads) gives the bits of (k * grid) in float64,
    # cast, with k from snap_noised_sums_ on the same clipped sums and the same stream.
    model = nn.Sequential(nn.Linear(6, 1200), nn.ReLU(), nn.Linear(1200, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for sigma in (1e-9, 3.0, 7e4):
        dp_model, dp_opt, loader, _ = make_private(model, opt, _loader(), sigma, 1.0, KEY)
        xb, yb = next(b for b in loader if len(b[0]) > 0)
        nn.functional.cross_entropy(dp_model(xb), yb).backward()
        dp_opt.clip_and_accumulate()
        dp_opt.add_noise()
        sums = [p.summed_grad for p in dp_opt.params]
        grid = noise_grid(sigma)
        k = snap_noised_sums_(sums, ChaCha20Random(KEY, NOISE_STREAM), sigma, grid)
        assert k.numel() > SMALL_DRAW and dp_opt._noised_buffer is None  # the fused path
        expected = (k * grid).to(torch.float32)
        got = torch.cat([p.grad.flatten() for p in dp_opt.params])
        assert torch.equal(got, expected)
        dp_opt.zero_grad(set_to_none=True)
        dp_model._close()


@pytest.mark.parametrize("std", [1e-306, 1.3, 7e4])  # 1e-306: a grid below 2**-1022
def test_snapped_noised_grads_gives_the_bits_of_the_float64_buffer_path(std: float) -> None:
    # Issue 17 (bk17d): add_noise adds, snaps and casts block by block while the draws are in
    # the cache. Pieces cross tensor and block boundaries, an empty tensor and a float64 sum
    # sit between float32 ones: the values must be those of snap_noised_sums_ then the cast.
    gen = torch.Generator().manual_seed(5)  # the clipped sums: test data, not privacy noise
    sums = [
        torch.randn(PAIRS_PER_BLOCK + 11, generator=gen) * 3,
        torch.zeros(0),
        torch.randn(7, 9, generator=gen, dtype=torch.float64),
        torch.randn(3 * PAIRS_PER_BLOCK // 2, generator=gen) * 1e3,
    ]
    if std < 1e-300:  # sums of the noise's size: float64, since float32 cannot hold them
        sums = [s.double() * std for s in sums]
    grid = noise_grid(std)
    grads = snapped_noised_grads(sums, ChaCha20Random(KEY, NOISE_STREAM), std, grid)
    k = snap_noised_sums_(sums, ChaCha20Random(KEY, NOISE_STREAM), std, grid)
    offset = 0
    for summed, grad in zip(sums, grads, strict=True):
        size = summed.numel()
        assert grad.dtype == summed.dtype and grad.shape == summed.shape
        expected = (k[offset : offset + size] * grid).to(summed.dtype).view_as(summed)
        assert torch.equal(grad, expected)
        offset += size
    assert not torch.equal(grads[0], sums[0])  # the premise: noise was added
    with pytest.raises(ValueError, match="contiguous"):
        snapped_noised_grads([sums[2].t()], ChaCha20Random(KEY), std, grid)
