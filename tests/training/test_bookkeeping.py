"""Book-keeping clipping: Opacus's clipped sum from one backward pass, on real Opacus parts."""

import decimal
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsafe.errors import UserError
from fedsafe.models.mnist_cnn import MnistCNN
from fedsafe.privacy.secure_random import NOISE_STREAM, ChaCha20Random, noise_grid
from fedsafe.training.bookkeeping import (
    BookkeepingModule,
    _flushed,
    bookkeeping_refusal,
    check_bookkeeping_model,
    linear_record_norms,
    row_norm_bounds,
)
from fedsafe.training.dp_training import TrainPlan, make_private, private_backward, train_round
from fedsafe.training.secure_dp_sgd import (
    SecureNoiseBookkeepingDPOptimizer,
    SecureNoiseDPOptimizer,
    SecurePoissonSampler,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

KEY = bytes.fromhex("b0" * 32)
C = 1.5


def _mlp(seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)  # test weights, not privacy randomness
    return nn.Sequential(
        nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def _batch(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)  # test data, not privacy randomness
    # Scales from 0.01 to 10: some records' gradients far below C, others far above.
    scale = torch.logspace(-2, 1, n).unsqueeze(1)
    return torch.randn(n, 6, generator=gen) * scale, torch.randint(0, 3, (n,), generator=gen)


def _loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=len(x))


def _clipped_sums(mode: str, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The clipped sum of the batch (no noise), from the mode's own optimizer path."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_opt, _, _ = make_private(
        model, opt, _loader(x, y), 1.0, C, KEY, grad_sample_mode=mode
    )
    dp_opt.zero_grad(set_to_none=True)
    private_backward(dp_model, dp_opt, x, y)
    if mode == "hooks":
        dp_opt.clip_and_accumulate()  # zeroes non-finite records, then Opacus's clipping
    else:
        dp_opt.accumulate()  # p.grad already holds the clipped sum
    sums = [p.summed_grad.detach().clone() for p in dp_opt.params]
    dp_model._close()
    return sums


def _per_record_norms(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model = _mlp()
    norms = []
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    return torch.stack(norms)


def _assert_close(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    flat_got = torch.cat([g.flatten() for g in got])
    flat_ref = torch.cat([r.flatten() for r in ref])
    assert flat_ref.norm() > 0
    assert torch.allclose(flat_got, flat_ref, rtol=1e-5, atol=1e-5 * float(flat_ref.abs().max()))


def test_same_clipped_sum_as_hooks_with_records_above_and_below_the_norm() -> None:
    x, y = _batch()
    norms = _per_record_norms(x, y)
    assert (norms < 0.8 * C).sum() >= 3 and (norms > 1.5 * C).sum() >= 3  # the premise
    _assert_close(_clipped_sums("bookkeeping", x, y), _clipped_sums("hooks", x, y))


def test_a_non_finite_record_contributes_zero_as_with_hooks() -> None:
    x, y = _batch()
    for bad in (float("inf"), float("nan")):
        poisoned = x.clone()
        poisoned[7, 2] = bad
        got = _clipped_sums("bookkeeping", poisoned, y)
        assert all(torch.isfinite(g).all() for g in got)
        _assert_close(got, _clipped_sums("hooks", poisoned, y))
        # The same as the batch without that record.
        keep = torch.arange(len(x)) != 7
        _assert_close(got, _clipped_sums("bookkeeping", x[keep], y[keep]))


def test_empty_batch_gives_a_zero_sum_and_then_the_noise_alone() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    sigma = 3.0
    dp_model, dp_opt, loader, _ = make_private(
        model, opt, _loader(x, y), sigma, C, KEY, grad_sample_mode="bookkeeping"
    )
    assert type(dp_opt) is SecureNoiseBookkeepingDPOptimizer
    assert type(dp_opt).add_noise is SecureNoiseDPOptimizer.add_noise  # the secret noise
    assert isinstance(loader.batch_sampler, SecurePoissonSampler)
    dp_opt.zero_grad(set_to_none=True)
    private_backward(dp_model, dp_opt, torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in dp_opt.params)
    dp_opt.accumulate()
    dp_opt.add_noise()
    flat = torch.cat([p.grad.detach().flatten() for p in dp_opt.params]).double()
    g = noise_grid(sigma * C)
    assert torch.equal(flat / g, torch.round(flat / g))
    expected = ChaCha20Random(KEY, NOISE_STREAM).standard_normal(flat.numel()) * sigma * C
    assert np.allclose(flat.numpy(), expected, atol=g)
    # A full batch after the empty one still trains.
    dp_opt.zero_grad(set_to_none=True)
    private_backward(dp_model, dp_opt, x, y)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dp_opt.params)
    dp_model._close()


def test_same_update_and_privacy_event_as_hooks_in_a_training_round() -> None:
    gen = np.random.default_rng(2)  # test data, not privacy randomness
    x = (gen.normal(size=(96, 6)) * 3).astype(np.float32)
    y = gen.integers(0, 3, 96).astype(np.float32)
    start = _mlp()
    plan = dict(local_steps=4, batch_size=16, lr=1.0, dp=True, noise_multiplier=1e-9)
    updates, events = {}, {}
    for mode in ("hooks", "bookkeeping"):
        model = _mlp()
        p = TrainPlan(**plan, max_grad_norm=0.05, grad_sample_mode=mode)
        events[mode] = train_round(model, x, y, p, torch.device("cpu"), key=KEY)
        updates[mode] = torch.cat(
            [
                (a - b).detach().flatten()
                for a, b in zip(model.parameters(), start.parameters(), strict=True)
            ]
        )
    assert events["bookkeeping"] == events["hooks"] and events["hooks"] is not None
    _assert_close([updates["bookkeeping"]], [updates["hooks"]])


def test_frozen_parameters_keep_no_gradient_and_the_rest_match_hooks() -> None:
    x, y = _batch()

    def sums(mode: str) -> list[torch.Tensor]:
        model = _mlp()
        model[0].bias.requires_grad_(False)
        model[2].requires_grad_(False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        dp_model, dp_opt, _, _ = make_private(
            model, opt, _loader(x, y), 1.0, C, KEY, grad_sample_mode=mode
        )
        private_backward(dp_model, dp_opt, x, y)
        if mode == "hooks":
            dp_opt.clip_and_accumulate()
        else:
            dp_opt.accumulate()
        assert model[0].bias.grad is None and model[2].weight.grad is None
        dp_model._close()
        return [p.summed_grad for p in dp_opt.params]

    _assert_close(sums("bookkeeping"), sums("hooks"))


def test_refused_for_a_conv_model_naming_the_layer_and_the_fix() -> None:
    assert bookkeeping_refusal(_mlp()) is None
    assert "Conv2d" in str(bookkeeping_refusal(MnistCNN()))
    with pytest.raises(UserError, match=r"'bookkeeping'.*Conv2d.*--grad-sample-mode auto"):
        check_bookkeeping_model(MnistCNN())
    x = np.zeros((8, 1, 28, 28), np.float32)
    y = np.zeros(8, np.float32)
    plan = TrainPlan(1, 4, 0.1, grad_sample_mode="bookkeeping")
    model = MnistCNN()
    with pytest.raises(UserError, match="Conv2d"):
        train_round(model, x, y, plan, torch.device("cpu"))
    assert not model._forward_hooks  # nothing was attached to the refused model
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    assert "shares a parameter" in str(bookkeeping_refusal(tied))
    layer = nn.Linear(4, 4)
    assert "shares a parameter" in str(bookkeeping_refusal(nn.Sequential(layer, layer)))
    with pytest.raises(UserError, match="Embedding"):
        check_bookkeeping_model(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)))


def test_refused_during_the_forward_pass_for_sequences_and_reused_layers() -> None:
    wrapped = BookkeepingModule(nn.Linear(4, 2), C)
    with pytest.raises(UserError, match="batch, features"):
        wrapped(torch.zeros(3, 5, 4))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(x))

    with pytest.raises(UserError, match="once per forward pass"):
        BookkeepingModule(Twice(), C)(torch.zeros(3, 4))
    inplace = BookkeepingModule(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)), C)
    out = inplace(torch.ones(3, 4))
    with pytest.raises(UserError, match="in-place"):  # else: the gradient of the ReLU's output
        inplace.clipped_backward(out.sum(1))
    with torch.no_grad():  # evaluation keeps nothing and refuses nothing
        assert wrapped(torch.zeros(3, 5, 4)).shape == (3, 5, 2)


def test_close_removes_the_hooks() -> None:
    model = _mlp()
    wrapped = BookkeepingModule(model, C)
    assert all(len(m._forward_hooks) == 1 for m in model if isinstance(m, nn.Linear))
    wrapped._close()
    assert all(not m._forward_hooks for m in model)
    with pytest.raises(ValueError, match="max_grad_norm"):
        BookkeepingModule(model, 0.0)


def test_record_norms_are_those_of_opacus_norm_sampler_and_of_real_per_record_gradients() -> None:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    sampler = GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Linear]
    gen = torch.Generator().manual_seed(4)  # test data, not privacy randomness
    layer = nn.Linear(5, 3)
    a = torch.randn(7, 5, generator=gen)
    g = torch.randn(7, 3, generator=gen)
    ours = linear_record_norms(layer, a, g)
    theirs = list(sampler(layer, [a], g).values())
    assert len(ours) == len(theirs) == 2
    for x, y in zip(ours, theirs, strict=True):
        assert x.dtype == torch.float64  # squares in float64: no underflow (issue 17c)
        assert torch.allclose(x.float(), y, rtol=1e-6)
    per_record = torch.einsum("ni,nj->nij", g, a).flatten(1).norm(dim=1)
    assert torch.allclose(ours[0].float(), per_record, rtol=1e-6)
    layer.bias.requires_grad_(False)
    assert len(linear_record_norms(layer, a, g)) == 1


def _auto_optimizers(
    model: nn.Module, inputs: dict[str, torch.Tensor], y: torch.Tensor, batch_size: int
) -> dict[str, str]:
    """The optimizer ``make_private`` builds under ``auto`` for each named input set."""
    modes = {}
    for name, x in inputs.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        dp_model, dp_opt, _, _ = make_private(
            model, opt, loader, 1.0, C, KEY, grad_sample_mode="auto"
        )
        modes[name] = type(dp_opt).__name__
        dp_model._close()
    return modes


def test_auto_keeps_ghost_for_a_linear_only_model_applied_to_sequences() -> None:
    torch.manual_seed(3)  # test weights, not privacy randomness
    big = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 4))
    inputs = {"vectors": torch.randn(256, 64), "sequences": torch.randn(256, 5, 64)}
    modes = _auto_optimizers(big, inputs, torch.zeros(256, dtype=torch.long), 256)
    assert modes == {
        "vectors": "SecureNoiseBookkeepingDPOptimizer",
        "sequences": "SecureNoiseGhostDPOptimizer",
    }


def _weights_sum(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The bookkeeping clipped sum (no noise) of ``x`` under the global weights ``state``."""
    model = _mlp()
    model.load_state_dict(state)
    wrapped = BookkeepingModule(model, C)
    per_record = nn.functional.cross_entropy(wrapped(x), y, reduction="none")
    wrapped.clipped_backward(per_record)
    wrapped._close()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def test_global_weights_a_coordinator_picks_never_let_one_record_exceed_the_clipping_norm() -> None:
    """Attack (issue 17, docs/attacks/issue17.md): the coordinator picks the global model's
    weights (huge, overflowing, infinite or NaN) to make one record's contribution exceed C,
    or turn the clipped sum NaN. Each record's contribution (the sum with it minus the sum
    without it) stays within C and the sum finite; a record that overflows contributes zero,
    as if absent."""
    x, y = _batch(10)
    x[3] *= 1e6  # one outlier record, the one an attacker would single out
    base = _mlp().state_dict()
    attacks: dict[str, dict[str, torch.Tensor]] = {}
    for scale in (1e8, 1e19, 1e25):  # 1e25: every record's norm overflows
        attacks[f"x{scale:g}"] = {**base, "2.weight": base["2.weight"] * scale}
    for bad in (float("inf"), float("nan")):
        weight = base["0.weight"].clone()
        weight[0, 0] = bad
        attacks[str(bad)] = {**base, "0.weight": weight}
    attacks["huge bias"] = {**base, "4.bias": torch.tensor([3e38, -3e38, 0.0])}
    clipped_any = False
    for name, state in attacks.items():
        full = _weights_sum(state, x, y)
        assert full.isfinite().all(), name
        for i in range(len(x)):
            keep = torch.arange(len(x)) != i
            contribution = float((full - _weights_sum(state, x[keep], y[keep])).norm())
            assert contribution <= C * (1 + 1e-5), (name, i, contribution)
            clipped_any |= contribution > 0.99 * C
    assert clipped_any  # the premise: some records were clipped, not all zeroed


def test_auto_trains_a_small_linear_model_with_bookkeeping_and_on_sequences_with_hooks() -> None:
    torch.manual_seed(4)  # test weights, not privacy randomness
    small = nn.Sequential(nn.Linear(13, 1))
    inputs = {"vectors": torch.randn(16, 13), "sequences": torch.randn(16, 3, 13)}
    modes = _auto_optimizers(small, inputs, torch.zeros(16), 4)
    assert modes == {
        "vectors": "SecureNoiseBookkeepingDPOptimizer",
        "sequences": "SecureNoiseDPOptimizer",
    }


def test_weights_that_underflow_the_output_gradients_square_never_let_a_record_exceed_c() -> None:
    """Attack (issue 17c, docs/attacks/issue17c.md): the coordinator makes a layer's output
    gradient g tiny (entries ~2e-23, whose float32 squares underflow: |g| computed as 0) and
    its input a huge (|a| ~1.7e19, still finite), so the record's computed norm was 0 and its
    true contribution g a^T (~4.6e-4) passed unclipped, 464 x C at the smallest C the config
    allows. Norms in float64 clip it to C."""
    small_c = 1e-6
    torch.manual_seed(0)  # test data, not privacy randomness
    x = torch.randn(8, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    state = _mlp().state_dict()
    state["2.weight"] = torch.zeros_like(state["2.weight"])
    state["2.bias"] = torch.full_like(state["2.bias"], 3e18)
    state["4.weight"] = torch.zeros_like(state["4.weight"])
    state["4.bias"] = torch.tensor([52.3, 0.0, 0.0])

    def clipped_sum(keep: torch.Tensor) -> torch.Tensor:
        model = _mlp()
        model.load_state_dict(state)
        wrapped = BookkeepingModule(model, small_c)
        loss = nn.functional.cross_entropy(wrapped(x[keep]), y[keep], reduction="none")
        wrapped.clipped_backward(loss)
        wrapped._close()
        return torch.cat([p.grad.flatten().double() for p in model.parameters()])

    every = torch.ones(len(x), dtype=torch.bool)
    full = clipped_sum(every)
    assert full.isfinite().all()
    for i in range(len(x)):
        contribution = float((full - clipped_sum(torch.arange(len(x)) != i)).norm())
        assert contribution <= small_c * (1 + 1e-5), (i, int(y[i]), contribution)
        assert contribution > 0.99 * small_c  # the premise: every record was clipped, none lost


class _ReusesALayer(nn.Module):
    """A Linear-only model that applies one layer twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)  # test weights, not privacy randomness
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.hidden(x)))))


def test_auto_does_not_pick_bookkeeping_for_a_model_that_reuses_a_layer() -> None:
    """Issue 17c: since auto picks book-keeping at any size, a small Linear-only model that
    applies a layer twice (which book-keeping refuses only during the forward pass) failed
    at its first step under ``auto`` (before: hooks). A forward probe on zeros sends it to the
    mode a sequence model gets; the gradients and the records are not touched by the probe."""
    model = _ReusesALayer()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,)).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_opt, _, _ = make_private(
        model, opt, _loader(x, y), 1.0, C, KEY, grad_sample_mode="auto"
    )
    assert type(dp_opt) is SecureNoiseDPOptimizer  # hooks: small
    assert all(p.grad is None for p in model.parameters())  # the probe ran no backward pass
    with_buffers = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1))
    make_private(with_buffers, opt, _loader(x + 5, y), 1.0, C, KEY, grad_sample_mode="auto")[
        0
    ]._close()
    assert int(with_buffers[1].num_batches_tracked) == 0  # nor moved a running statistic
    private_backward(dp_model, dp_opt, x, y)  # trains
    assert all(p.grad_sample is not None for p in model.parameters())
    dp_model._close()
    with pytest.raises(UserError, match="applied once per forward pass"):
        make_private(
            _ReusesALayer(), opt, _loader(x, y), 1.0, C, KEY, grad_sample_mode="bookkeeping"
        )[0](x)


def test_a_subnormal_output_gradient_rounded_by_the_clip_factor_never_exceeds_c() -> None:
    """Attack (issue 17c): output gradients of 3 units in the last place of float32's
    subnormals (4.2e-45) times a clip factor of 0.51 round up to 2 units (1.53 -> 2), and
    inputs of 1e37 carried that rounding into the weight gradient: 1.25 x C. Scaled entries
    below float32's smallest normal are flushed to zero (the record then contributes less)."""
    layer = nn.Linear(512, 512, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    a = torch.full((1, 512), 1e37)
    k = torch.full((1, 512), 3 * 1.401298464324817e-45)
    assert float(k[0, 0]) > 0  # the premise: a subnormal, not zero
    norm = float(linear_record_norms(layer, a, k)[0][0])
    c = 0.51 * (norm + 1e-6)  # a clip factor of 0.51
    wrapped = BookkeepingModule(nn.Sequential(layer), c)
    wrapped.clipped_backward((wrapped(a) * k).sum(dim=1))
    wrapped._close()
    assert float(layer.weight.grad.double().norm()) <= c * (1 + 1e-6)


def _exact_square_norms(x: torch.Tensor) -> list[Fraction]:
    """Each row's sum of squares in exact rational arithmetic (the values as stored)."""
    return [sum((Fraction(v) ** 2 for v in row.tolist()), Fraction(0)) for row in x.double()]


def _adversarial_rows(n: int) -> torch.Tensor:
    """Issue 17c's inputs and more: tiny entries whose float32 squares underflow beside huge
    ones, subnormals, entries near float32's largest, mixed scales, zeros."""
    gen = torch.Generator().manual_seed(n)  # test data, not privacy randomness
    x = torch.randn(9, n, generator=gen)
    x[1] = 2.3e-23  # every square underflows float32 (attack17c's output gradient)
    x[2] *= 1.7e19  # squares overflow float32 (attack17c's input)
    x[3] = 4.2e-45  # subnormal entries
    x[4] = 3.0e38 * torch.rand(n, generator=gen)  # near float32's largest
    x[5] *= torch.logspace(-40, 38, n)  # every scale in one row
    x[6] = 0.0
    x[6, n // 2] = 1e-30  # one tiny entry among zeros
    x[7] = 1.0
    x[7, 0] = 3e-39  # a subnormal beside normal entries
    x[8] *= 1e-20
    # Random rows after them, to the size from which float32 blocks are used (65,536).
    return torch.cat([x, torch.randn(-(-65_536 // n), n, generator=gen)])


@pytest.mark.parametrize("n", [10, 90, 509, 512])  # blocks of 10, 30, float64 (prime), 32
def test_row_norm_bounds_are_never_below_the_exact_norm_and_tight(n: int) -> None:
    """Issue 17 (bk17d): float32 block norms with their rounding and underflow bounded
    replace the float64 norms; a bound below the exact norm would let a clip factor exceed
    the exact one (a record above C). Checked against exact rational sums of squares."""
    x = _adversarial_rows(n)
    bounds = row_norm_bounds(x)[:40]
    assert bounds.dtype == torch.float64
    exact = _exact_square_norms(x[:40])
    width = 32 if n % 32 == 0 else (30 if n == 90 else n)
    slack = 1 + (width + 5) * 2.0**-24 if n != 509 else 1 + 2.0**-40
    for i, (bound, square) in enumerate(zip(bounds.tolist(), exact, strict=True)):
        assert Fraction(bound) ** 2 >= square, (n, i)
        if square > 0:  # tight: within the proven inflation
            assert Fraction(bound) ** 2 <= square * Fraction(slack) ** 2, (n, i)
        else:
            assert bound == 0.0 or bound <= math.sqrt(3 * n * 2.0**-126) * 1.01
    # A row with an infinity or a NaN stays non-finite (the record is then zeroed).
    x[0, 3], x[1, 0] = float("inf"), float("nan")
    bounds = row_norm_bounds(x)
    assert math.isinf(bounds[0]) and math.isnan(bounds[1]) and bounds[2:].isfinite().all()
    # Below 65,536 entries the float64 path gives the same guarantee.
    small = row_norm_bounds(x[2:9])
    for bound, square in zip(small.tolist(), _exact_square_norms(x[2:9]), strict=True):
        assert square <= Fraction(bound) ** 2 <= square * (1 + Fraction(n + 4, 2**52))


def test_flush_zeroes_exactly_the_subnormal_entries() -> None:
    for dtype in (torch.float32, torch.float64):
        info = torch.finfo(dtype)
        below = torch.nextafter(
            torch.tensor(info.tiny, dtype=dtype), torch.tensor(0.0, dtype=dtype)
        )
        values = torch.tensor([info.tiny, -info.tiny, 1.0, 0.0, float("nan")], dtype=dtype)
        values = torch.cat([values, below.view(1), -below.view(1)])
        out = _flushed(values)
        assert out[:4].tolist() == [info.tiny, -info.tiny, 1.0, 0.0]
        assert math.isnan(out[4]) and out[5:].tolist() == [0.0, 0.0]


def test_clip_factors_from_the_bounds_never_exceed_the_exact_ones() -> None:
    """The clip factor min(1, C / (norm + 1e-6)) of every record of a batch mixing attack17c's
    layers (tiny output gradients, huge inputs) is at most the one from exact norms."""
    g = _adversarial_rows(512)
    a = _adversarial_rows(90)[: len(g)]
    a[:9] = a[:9].roll(-1, 0)  # row 1's tiny output gradients meet row 2's huge inputs
    layer = nn.Linear(90, 512)
    weight, bias = linear_record_norms(layer, a, g)
    exact_g, exact_a = _exact_square_norms(g[:9]), _exact_square_norms(a[:9])
    for i in range(9):
        total = weight[i] ** 2 + bias[i] ** 2
        if not math.isfinite(total):
            continue
        exact = exact_g[i] * exact_a[i] + exact_g[i]
        assert Fraction(float(total)) >= exact * (1 - Fraction(1, 2**50)), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_half_precision_model_never_lets_one_record_exceed_c(dtype: torch.dtype) -> None:
    """Attack (issue 17d): the record margin covered float32's roundings of the clip factor's
    cast and of the products (3 x 2**-24); in a float16 or bfloat16 model (a site's own task
    model) each rounds by 2**-11 or 2**-8, and a record contributed up to 1.0046 x C (one
    record per batch: its clipped gradient is its whole contribution)."""
    worst = 0.0
    for seed in range(12):
        torch.manual_seed(seed)  # test weights and data, not privacy randomness
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.weight.mul_(30)  # every record far above C
        wrapped = BookkeepingModule(model, 1.0)
        x, y = torch.randn(1, 64).to(dtype), torch.randint(0, 10, (1,))
        loss = nn.functional.cross_entropy(wrapped(x).float(), y, reduction="none")
        wrapped.clipped_backward(loss)
        wrapped._close()
        total = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())
        worst = max(worst, math.sqrt(total))
    assert 0.97 < worst <= 1.0  # near C (the records are far above it), never above


def test_same_clipped_sum_as_hooks_where_the_norms_take_float32_blocks() -> None:
    """Issue 17 (bk17d): layers of 512 units and a batch of 128 (65,536 entries per matrix)
    take row_norm_bounds' float32 blocks; the clipped sum still equals hooks' within 1e-5,
    with records far above and below C."""
    gen = torch.Generator().manual_seed(2)  # test data, not privacy randomness
    n = 128
    x = torch.randn(n, 64, generator=gen) * torch.logspace(-3, 1, n).unsqueeze(1)
    y = torch.randint(0, 3, (n,), generator=gen)
    record_norms = torch.zeros(n)

    def clipped(mode: str) -> list[torch.Tensor]:
        torch.manual_seed(6)  # test weights, not privacy randomness
        model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dp_model, dp_opt, _, _ = make_private(
            model, opt, _loader(x, y), 1.0, C, KEY, grad_sample_mode=mode
        )
        private_backward(dp_model, dp_opt, x, y)
        if mode == "hooks":
            for p in dp_opt.params:
                record_norms.add_(p.grad_sample.flatten(1).square().sum(dim=1))
            dp_opt.clip_and_accumulate()
        else:
            dp_opt.accumulate()
        sums = [p.summed_grad.detach().clone() for p in dp_opt.params]
        dp_model._close()
        return sums

    hooks = clipped("hooks")
    record_norms.sqrt_()
    assert (record_norms < 0.95 * C).sum() >= 3 and (record_norms > 1.5 * C).sum() >= 3
    _assert_close(clipped("bookkeeping"), hooks)


def test_float64_row_norm_bounds_never_underflow_or_overflow() -> None:
    """A float64 model (a user's task): a coordinator's weights could make a layer's output
    gradients ~1e-170 (squares underflow to 0 in float64) beside inputs ~1e150, so a plain
    float64 norm read |g| = 0 and the record's g a^T passed unclipped. Scaled rows bound it."""
    gen = torch.Generator().manual_seed(7)  # test data, not privacy randomness
    x = torch.randn(8, 512, generator=gen, dtype=torch.float64)
    x[0] *= 1e-170  # every square underflows float64
    x[1] *= 1e150  # squares near float64's largest
    x[2] *= torch.logspace(-300, 300, 512, dtype=torch.float64)  # every scale in one row
    x[3] = 5e-324  # subnormal entries (the bound's product is subnormal: rounded absolutely)
    x[4] = 0.0
    x[5, :] = 1.0
    x[5, 0] = 1e-320
    assert torch.linalg.vector_norm(x[0], dtype=torch.float64) == 0  # the premise
    bounds = row_norm_bounds(x)
    for i, (bound, square) in enumerate(zip(bounds.tolist(), _exact_square_norms(x), strict=True)):
        assert Fraction(bound) ** 2 >= square, i
        if square > 0:
            with decimal.localcontext() as ctx:
                ctx.prec = 40
                root = (
                    decimal.Decimal(square.numerator).sqrt()
                    / decimal.Decimal(square.denominator).sqrt()
                )
            assert Fraction(bound) <= Fraction(root) * (1 + Fraction(600, 2**53)) + Fraction(
                1, 2**1073
            ), i
        else:
            assert bound <= 2.0**-1074
    x[6, 3], x[7, 0] = float("inf"), float("nan")
    bounds = row_norm_bounds(x)
    assert not bounds[6].isfinite() and not bounds[7].isfinite() and bounds[:6].isfinite().all()
