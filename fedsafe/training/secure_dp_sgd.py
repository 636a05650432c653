"""Opacus's DP-SGD with secret randomness: a ChaCha20 Poisson sampler and noise override.

Opacus 1.6 (Yousefpour et al., 2021) draws Poisson batches and Gaussian noise from a
``torch.Generator`` (Mersenne Twister or Philox, 64-bit seed at most; torch's CPU Mersenne
Twister keeps the low 32 bits), and its ``secure_mode`` needs ``torchcsprng``, which does not
support torch 2.13. These two parts replace exactly those draws with
:class:`~fedsafe.privacy.secure_random.ChaCha20Random` streams and keep the rest of Opacus's
DP-SGD step (per-record clipping, accumulation, scaling). :func:`fedsafe.training.dp_training.
make_private` assembles them; this module is imported only when a site trains, since Opacus
takes seconds to load.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import Sampler

from fedsafe.privacy.secure_random import (
    PAIRS_PER_BLOCK,
    SMALL_DRAW,
    ChaCha20Random,
    noise_grid,
)


class SecurePoissonSampler(Sampler[list[int]]):
    """Poisson batch sampling from a secret ChaCha20 stream (replaces Opacus's sampler).

    Every step, each of the ``num_records`` records enters the batch independently with
    probability exactly ``floor(sample_rate * 2**64) / 2**64 <= sample_rate`` (a 64-bit integer
    comparison, :meth:`~fedsafe.privacy.secure_random.ChaCha20Random.bernoulli`), so
    accounting with ``sample_rate`` is never below the rate really used. Opacus's
    ``UniformWithReplacementSampler`` draws the same batches from a ``torch.Generator``.

    Parameters
    ----------
    num_records
        Records in the dataset, >= 1.
    sample_rate
        Poisson rate ``q`` in (0, 1].
    steps
        Batches per pass over the sampler (``len``), >= 1. A new pass continues the stream.
    rng
        The secret generator; its stream must serve nothing else.
    """

    def __init__(
        self, num_records: int, sample_rate: float, steps: int, rng: ChaCha20Random
    ) -> None:
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.num_records = num_records
        self.sample_rate = sample_rate
        self.steps = steps
        self._rng = rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self._rng.bernoulli(self.sample_rate, self.num_records)
            yield np.flatnonzero(mask).tolist()


class _SecureNoise:
    """``add_noise`` from a secret ChaCha20 stream, shared by both optimizer classes.

    Mixed in before an Opacus optimizer class, so its :meth:`add_noise` replaces Opacus's
    (``torch.Generator`` draws) and everything else (clipping or not, accumulation, scaling
    by the expected batch size, the double-noise guard) stays Opacus's.
    """

    noise_rng: ChaCha20Random
    _noised_buffer: torch.Tensor | None
    noise_multiplier: float
    max_grad_norm: float
    params: list[Any]  # Opacus adds summed_grad to each parameter

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        noise_rng: ChaCha20Random,
    ) -> None:
        _check_dp_parameters(noise_multiplier, max_grad_norm)
        super().__init__(  # type: ignore[call-arg]  # the Opacus class mixed in after
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=None,
            secure_mode=False,
        )
        self.noise_rng = noise_rng
        self._noised_buffer: torch.Tensor | None = None

    def add_noise(self) -> None:
        """Set each ``p.grad`` to its clipped sum plus secret noise, snapped to the grid.

        One call draws the noise of every parameter (a single keystream read per step). On the
        CPU (float32 or float64 sums), each block of draws is added to the matching pieces of
        the clipped sums in float64 and snapped while it is in the cache
        (:func:`snapped_noised_grads`); elsewhere the clipped sums are gathered into one
        reused float64 buffer on their device, noised and snapped there in place
        (:func:`snap_noised_sums_`). The same values either way (tested); each ``p.grad`` is a
        new tensor of the parameter's dtype.
        """
        std = self.noise_multiplier * self.max_grad_norm
        grid = noise_grid(std)
        for p in self.params:
            # Opacus's guard against noising the same clipped sum twice (private helpers).
            _check_processed_flag(p.summed_grad)
        sums = [p.summed_grad for p in self.params]
        total = sum(s.numel() for s in sums)
        if total <= SMALL_DRAW or len({s.device for s in sums}) > 1:
            # Tiny models (numpy's lower cost per call wins) or parameters spread over
            # devices: the same draws, each parameter on its own.
            draws = self.noise_rng.standard_normal(total)
            draws *= std
            self._add_noise_per_parameter(sums, draws, grid)
            return
        if all(_fused_noise_applies(s) for s in sums):
            grads = snapped_noised_grads(sums, self.noise_rng, std, grid)
            for p, grad in zip(self.params, grads, strict=True):
                p.grad = grad.view_as(p)
                _mark_as_processed(p.summed_grad)
            return
        self._noised_buffer = snap_noised_sums_(
            sums, self.noise_rng, std, grid, self._noised_buffer
        )
        offset = 0
        for p, summed in zip(self.params, sums, strict=True):
            size = summed.numel()
            grad = torch.empty_like(summed, memory_format=torch.contiguous_format)
            k = self._noised_buffer[offset : offset + size]
            flat = grad.view(-1)
            if grad.dtype in (torch.float32, torch.float64):
                # The cast of the integer k, then the product with the power-of-two grid in
                # the parameter's dtype: the same value as k * grid cast (a power-of-two
                # product is exact, and |k * grid| >= grid is far from the subnormals), in a
                # third of the time of the mixed-dtype product. Post-processing of k.
                flat.copy_(k)
                flat.mul_(grid)
            else:  # float16 or bfloat16: k alone could overflow
                torch.mul(k, grid, out=flat)
            p.grad = grad.view_as(p)
            offset += size
            _mark_as_processed(p.summed_grad)

    def _add_noise_per_parameter(
        self, sums: list[torch.Tensor], noise: NDArray[np.float64], grid: float
    ) -> None:
        offset = 0
        for p, summed in zip(self.params, sums, strict=True):
            size = summed.numel()
            p.grad = snapped_noised_sum(summed, noise[offset : offset + size], grid).view_as(p)
            offset += size
            _mark_as_processed(p.summed_grad)


def zero_non_finite_records(params: list[torch.nn.Parameter]) -> None:
    """Set to zero, in every parameter's ``grad_sample``, the records with a non-finite value.

    Parameters
    ----------
    params
        Parameters whose ``grad_sample`` is one tensor with a row per record of the batch.

    Raises
    ------
    ValueError
        If a ``grad_sample`` is missing or a list (Opacus's gradient accumulation, which
        fedsafe forbids).
    """
    samples: list[torch.Tensor] = []
    for p in params:
        g = getattr(p, "grad_sample", None)
        if not isinstance(g, torch.Tensor):
            raise ValueError("per-record gradients must be one tensor per parameter")
        samples.append(g)
    if not samples or len(samples[0]) == 0:
        return
    rows = [g.reshape(len(g), -1).isfinite().all(dim=1) for g in samples]
    finite = torch.stack(rows).all(dim=0)
    for p, g in zip(params, samples, strict=True):
        keep = finite.to(g.device).view(-1, *([1] * (g.dim() - 1)))
        p.grad_sample = torch.where(  # type: ignore[attr-defined]
            keep, g, torch.zeros((), dtype=g.dtype, device=g.device)
        )


def _check_dp_parameters(noise_multiplier: float, max_grad_norm: float) -> None:
    if not (noise_multiplier > 0 and max_grad_norm > 0):
        raise ValueError(
            "noise_multiplier and max_grad_norm must be > 0 for DP-SGD, got "
            f"{noise_multiplier} and {max_grad_norm}"
        )


class SecureNoiseDPOptimizer(_SecureNoise, DPOptimizer):
    """Opacus's DP-SGD optimizer with secret, grid-snapped Gaussian noise.

    Clipping, accumulation and scaling are Opacus's (``DPOptimizer``, flat clipping, one
    process, per-sample gradients from hooks or functorch). Only :meth:`add_noise` changes:
    the noise of standard deviation ``noise_multiplier * max_grad_norm`` is drawn on the CPU
    from ``noise_rng`` (ChaCha20, Box-Muller, float64), moved to the parameter's device, added
    to the clipped sum in float64 and the sum rounded to
    :func:`~fedsafe.privacy.secure_random.noise_grid` (the floating-point defence of
    :mod:`fedsafe.privacy.secure_random`), then cast to the parameter's dtype. Opacus's
    ``generator`` and ``secure_mode`` are unused.

    Parameters
    ----------
    optimizer
        The wrapped optimizer (SGD in fedsafe).
    noise_multiplier, max_grad_norm
        Noise standard deviation over the clipping norm, > 0; clipping norm, > 0.
    expected_batch_size
        The public expected batch size, Opacus's denominator of the mean over a Poisson batch.
    noise_rng
        The secret generator; its stream must serve nothing else.
    """

    def clip_and_accumulate(self) -> None:
        """Opacus's per-record clipping, after zeroing every record whose gradient is not finite.

        The coordinator chooses the global model. With an infinite weight (or finite weights
        that overflow in a dot product) one record's logit becomes ``inf * 0`` or
        ``inf - inf``, its per-record gradient NaN, and Opacus's clip factor ``C / (NaN +
        1e-6)`` NaN: the whole noisy sum, and so the released model, would be NaN exactly when
        such a record was sampled, a membership bit no noise hides. A record whose gradient
        holds a NaN or an infinity contributes zero instead, so every record's clipped
        contribution stays a function of that record and the model with norm at most
        ``max_grad_norm``, as the accounting assumes.
        """
        zero_non_finite_records(self.params)
        super().clip_and_accumulate()


class SecureNoiseGhostDPOptimizer(_SecureNoise, DPOptimizerFastGradientClipping):
    """Opacus's ghost-clipping optimizer with the same secret, grid-snapped noise.

    Ghost clipping (Li et al., "Large Language Models Can Be Strong Differentially Private
    Learners", ICLR 2022; Bu et al., 2023) computes per-record gradient norms without
    per-record gradients for ``Linear`` and ``Embedding`` layers and clips by reweighting the
    per-record losses in a second backward pass, so ``p.grad`` already holds the clipped sum
    when :meth:`step` runs. This class (``DPOptimizerFastGradientClipping``) only adds noise
    and divides by ``expected_batch_size``; its :meth:`add_noise` is the one of
    :class:`SecureNoiseDPOptimizer` (ChaCha20 noise snapped to the grid), never Opacus's.

    Parameters
    ----------
    optimizer
        The wrapped optimizer (SGD in fedsafe).
    noise_multiplier, max_grad_norm
        Noise standard deviation over the clipping norm, > 0; clipping norm, > 0.
    expected_batch_size
        The public expected batch size, the denominator of the mean over a Poisson batch.
    noise_rng
        The secret generator; its stream must serve nothing else.
    """


def snapped_noised_sum(
    summed: torch.Tensor, noise: NDArray[np.float64], grid: float
) -> torch.Tensor:
    """``summed`` plus ``noise``, rounded to the power-of-two ``grid``, in ``summed``'s dtype.

    ``noise`` (float64, drawn on the CPU, ``summed.numel()`` values) is moved to
    ``summed.device``; the sum and the rounding to the grid
    (:func:`~fedsafe.privacy.secure_random.noise_grid`) are computed there in float64 (IEEE
    addition, division by a power of two and round-half-even give the same bits on CPU and
    CUDA), and the result is cast to ``summed.dtype``, shape unchanged.
    """
    on_device = torch.from_numpy(noise).to(summed.device).view(summed.shape)
    noised = summed.to(torch.float64) + on_device
    noised.div_(grid).round_().mul_(grid)
    return noised.to(summed.dtype)


def snap_noised_sums_(
    sums: list[torch.Tensor],
    rng: ChaCha20Random,
    std: float,
    grid: float,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every clipped sum plus Gaussian noise of ``std``, in units of the power-of-two ``grid``.

    Parameters
    ----------
    sums
        The clipped sums (any dtypes and shapes, all on one device), in order.
    rng
        The secret noise stream: one :meth:`~fedsafe.privacy.secure_random.ChaCha20Random.
        add_standard_normal_` read of the sums' total size.
    std
        Noise standard deviation (``noise_multiplier * max_grad_norm``), > 0.
    grid
        The power-of-two grid (:func:`~fedsafe.privacy.secure_random.noise_grid` of ``std``).
    buffer
        A float64 tensor on the sums' device to reuse when it has the right size; otherwise
        a new one is made.

    Returns
    -------
    torch.Tensor
        Float64, shape ``(total size,)``, on the sums' device: the integers ``k`` such that
        ``k * grid`` is the released value, the flattened sums concatenated. The sum, the
        division by the grid (exact) and the round-half-even are computed in float64 on the
        device (on CUDA the noise is drawn on the CPU and copied there once), as in
        :func:`snapped_noised_sum`.

    Raises
    ------
    ValueError
        If the sums are on several devices.
    """
    total = sum(s.numel() for s in sums)
    devices = {s.device for s in sums}
    if len(devices) > 1:
        raise ValueError(f"clipped sums on several devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    if (
        buffer is None
        or buffer.numel() != total
        or buffer.device != device
        or buffer.dtype != torch.float64
    ):
        buffer = torch.empty(total, dtype=torch.float64, device=device)
    offset = 0
    for summed in sums:
        size = summed.numel()
        buffer[offset : offset + size].copy_(summed.reshape(-1))
        offset += size
    rng.add_standard_normal_(buffer, std)
    return buffer.div_(grid).round_()


def _fused_noise_applies(summed: torch.Tensor) -> bool:
    return (
        summed.device.type == "cpu"
        and summed.dtype in (torch.float32, torch.float64)
        and summed.is_contiguous()
    )


def snapped_noised_grads(
    sums: list[torch.Tensor], rng: ChaCha20Random, std: float, grid: float
) -> list[torch.Tensor]:
    """Each clipped sum plus Gaussian noise of ``std``, snapped to ``grid``, as a new tensor.

    The values of :func:`snap_noised_sums_` followed by ``add_noise``'s cast (``k * grid`` in
    the sum's dtype), bit for bit, without its float64 buffer of every value: the range of
    the sums each half of a Box-Muller block of :meth:`~fedsafe.privacy.secure_random.
    ChaCha20Random.polar_blocks` covers is copied into a small float64 scratch, and the block
    is added while it is in the CPU's cache (the same fused multiply-add over the same
    range), divided by the power-of-two grid, rounded half to even, multiplied back (exact)
    and written into the new tensors. The keystream read
    and the order of the draws are those of one :meth:`~fedsafe.privacy.secure_random.
    ChaCha20Random.add_standard_normal_` call of the sums' total size.

    Parameters
    ----------
    sums
        The clipped sums in order: contiguous float32 or float64 CPU tensors.
    rng
        The secret noise stream.
    std
        Noise standard deviation (``noise_multiplier * max_grad_norm``), > 0.
    grid
        The power-of-two grid (:func:`~fedsafe.privacy.secure_random.noise_grid` of ``std``).

    Returns
    -------
    list of torch.Tensor
        Shapes and dtypes of ``sums``: ``k * grid`` with ``k = round((s + std z) / grid)``
        computed in float64.

    Raises
    ------
    ValueError
        If a sum is not a contiguous float32 or float64 CPU tensor.
    """
    if not all(_fused_noise_applies(s) for s in sums):
        raise ValueError("snapped_noised_grads needs contiguous float32 or float64 CPU sums")
    grads = [torch.empty_like(s) for s in sums]
    sources = [s.view(-1) for s in sums]
    targets = [g.view(-1) for g in grads]
    ends = list(accumulate(s.numel() for s in sums))
    total = ends[-1] if ends else 0
    rest = (total + 1) // 2
    scratch = torch.empty(min(PAIRS_PER_BLOCK, max(rest, 1)), dtype=torch.float64)
    # Dividing by a power of two and multiplying by its inverse both round the same exact
    # value once (IEEE 754), so they agree bit for bit whenever the inverse is a float64.
    inverse = 1.0 / grid if grid >= 2.0**-1022 else None
    for first, last, radius, cosines, sines in rng.polar_blocks(total):
        # Draw i is radius * cosine of pair i for i < rest, radius * sine of pair i - rest
        # after it (the layout of standard_normal).
        halves = ((first, last, cosines), (rest + first, min(rest + last, total), sines))
        for start, stop, trig in halves:
            size = stop - start
            span = scratch[:size]
            pieces = list(_pieces(ends, start, stop))
            for index, lo, hi, at in pieces:  # the sums' values of this range, in float64
                span[at : at + hi - lo].copy_(sources[index][lo:hi])
            span.addcmul_(radius[:size], trig[:size], value=std)
            # k * grid: the product by a power of two is exact, and the cast to the sum's
            # dtype rounds it as add_noise's cast of k then product does.
            if inverse is None:
                span.div_(grid)
            else:
                span.mul_(inverse)  # the same bits as the division, a third of its cost
            span.round_().mul_(grid)
            for index, lo, hi, at in pieces:
                targets[index][lo:hi].copy_(span[at : at + hi - lo])
    return grads


def _pieces(ends: list[int], start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
    """``(tensor, lo, hi, at)`` for each tensor the flat range ``start:stop`` overlaps.

    ``lo:hi`` is the overlap in the tensor's own flat indices and ``at`` its offset from
    ``start``; ``ends`` holds each tensor's end in the concatenation.
    """
    index = bisect_right(ends, start)
    position = start
    while position < stop:
        begin = ends[index - 1] if index else 0
        end = min(ends[index], stop)
        if end > position:  # an empty tensor has no piece
            yield index, position - begin, end - begin, position - start
        position = end
        index += 1


class SecureNoiseBookkeepingDPOptimizer(_SecureNoise, DPOptimizerFastGradientClipping):
    """The optimizer of the ``bookkeeping`` mode: ``p.grad`` already holds the clipped sum.

    :class:`~fedsafe.training.bookkeeping.BookkeepingModule` writes each parameter's clipped
    sum of per-record gradients (Bu et al., ICML 2023: one backward pass) into ``p.grad``;
    this optimizer, like :class:`SecureNoiseGhostDPOptimizer`, only adds the secret noise
    snapped to the grid (:meth:`SecureNoiseDPOptimizer.add_noise`, never Opacus's) and divides
    by ``expected_batch_size``. A separate class so that
    :func:`~fedsafe.training.dp_training.private_backward` runs the matching backward pass.
    Its parameters are those of :class:`SecureNoiseGhostDPOptimizer`.
    """

    def accumulate(self) -> None:
        """Keep each ``p.grad`` (the clipped sum) as ``p.summed_grad``, without Opacus's copy.

        ``p.grad`` is a fresh tensor written by the book-keeping backward pass at every step,
        and :meth:`add_noise` replaces ``p.grad`` with a new tensor, so no copy is needed. A
        second backward pass before the step (gradient accumulation, which fedsafe does not
        use) adds to the kept sum as Opacus does.
        """
        for p in self.params:
            if p.summed_grad is None:
                p.summed_grad = p.grad.detach()
            else:
                p.summed_grad.add_(p.grad.detach())
