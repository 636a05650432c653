"""Local training at a site: DP-SGD with Opacus, or plain SGD for the non-private baseline.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) as implemented by
Opacus (Yousefpour et al., 2021): each step draws a batch by Poisson sampling (every record
independently with probability ``q``), clips each record's gradient to ``max_grad_norm``, and
adds Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm``. The step count
and the sampling rate actually used are returned as a :class:`PoissonGaussianEvent`, so the
accounting always matches the sampling actually used.

Batch sampling and noise are secret: both come from ChaCha20 streams keyed with 256 bits from
``os.urandom`` (:mod:`fedsafe.privacy.secure_random`), not from Opacus's ``torch.Generator``,
and the noised sums are snapped to a grid finer than the noise (the floating-point defence
stated there). Opacus still clips; the non-private baseline alone shuffles with torch.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from fedsafe.config import MAX_MAX_GRAD_NORM, MIN_MAX_GRAD_NORM
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.privacy.secure_random import NOISE_STREAM, SAMPLING_STREAM, ChaCha20Random, fresh_key
from fedsafe.training.grad_sample_mode import (
    check_grad_sample_mode,
    mode_for_sequences,
    resolve_grad_sample_mode,
)
from fedsafe.training.malloc_tuning import keep_freed_memory
from fedsafe.training.model_check import check_model_for_dp

if TYPE_CHECKING:
    from fedsafe.training.secure_dp_sgd import (
        SecureNoiseBookkeepingDPOptimizer,
        SecureNoiseDPOptimizer,
        SecureNoiseGhostDPOptimizer,
    )

EVAL_CHUNK = 256
"""Records per forward pass in :func:`evaluate_model`: bounded activations, no page storm."""

Records = NDArray[Any] | torch.Tensor
"""Records or labels: a numpy array or a tensor, first axis = records."""

PerRecordLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(outputs, targets)`` -> one loss per record, shape ``(batch,)`` (no reduction)."""

OPTIMIZERS = ("sgd", "adam")
"""Local optimizers a :class:`TrainPlan` may name (Adam: FLamby's non-private baselines)."""


@dataclass(frozen=True, slots=True)
class TrainPlan:
    """How a site trains one round.

    Parameters
    ----------
    local_steps
        Optimizer steps per round (FLamby: 100 batch updates).
    batch_size
        Expected batch size; the Poisson rate is ``1 / ceil(n / batch_size)``.
    lr
        Client learning rate (SGD).
    dp
        Train with DP-SGD; False is the non-private baseline.
    noise_multiplier
        Noise standard deviation over the clipping norm (ignored without DP).
    max_grad_norm
        Per-record gradient clipping norm.
    proximal_mu
        FedProx proximal weight (Li et al., MLSys 2020); 0 disables it.
    sample_rate
        Poisson rate per record, in (0, 1]; None = ``1 / ceil(n / batch_size)``. The ClientApp
        passes the rate of the site's *public* size, so the exact size never shapes the update.
    grad_sample_mode
        How per-record norms are computed (:mod:`fedsafe.training.grad_sample_mode`): ``auto``,
        ``hooks``, ``ghost``, ``functorch`` or ``bookkeeping``. It changes the cost only: the
        clipped update and the privacy event are the same.
    optimizer
        ``sgd`` (fedsafe's sites) or ``adam`` (Kingma and Ba, ICLR 2015; FLamby's baselines).
        Under DP either one steps on the clipped, noised gradient (post-processing).
    """

    local_steps: int
    batch_size: int
    lr: float
    dp: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.0
    sample_rate: float | None = None
    grad_sample_mode: str = "auto"
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        check_grad_sample_mode(self.grad_sample_mode)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.local_steps < 1:
            raise ValueError(f"local-steps must be >= 1, got {self.local_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"client-lr must be > 0, got {self.lr}")
        if self.dp and not self.noise_multiplier > 0:
            raise ValueError(f"noise-multiplier must be > 0 with DP, got {self.noise_multiplier}")
        if self.dp and not MIN_MAX_GRAD_NORM <= self.max_grad_norm <= MAX_MAX_GRAD_NORM:
            raise ValueError(
                f"max-grad-norm must be in [{MIN_MAX_GRAD_NORM:g}, {MAX_MAX_GRAD_NORM:g}] "
                f"(float32 clipping), got {self.max_grad_norm}"
            )
        if self.proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")


def poisson_sample_rate(num_records: int, batch_size: int) -> float:
    """The Poisson rate Opacus uses for a loader of this size: ``1 / ceil(n / batch_size)``."""
    return 1.0 / int(np.ceil(num_records / batch_size))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when the site has it, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def output_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fedsafe's default per-record loss, shape ``(batch,)``.

    Binary cross-entropy on one logit (``outputs`` of shape ``(batch, 1)``, labels 0/1), or
    cross-entropy over classes (``(batch, K)``, integer labels).
    """
    if outputs.shape[-1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(
            outputs.reshape(-1), y.float(), reduction="none"
        )
    return nn.functional.cross_entropy(outputs, y.long(), reduction="none")


def _loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: PerRecordLoss | None = None
) -> torch.Tensor:
    """The batch's mean loss (``loss``, default :func:`output_loss`)."""
    return _per_record_loss(model, x, y, loss).mean()


def _per_record_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: PerRecordLoss | None = None
) -> torch.Tensor:
    """:func:`_loss` before the mean over the batch, shape ``(batch,)``."""
    return (loss or output_loss)(model(x), y).reshape(-1)


def _records_not_vectors(loader: DataLoader[Any]) -> bool:
    """Whether the loader's first record is not a feature vector (e.g. a sequence)."""
    dataset = loader.dataset
    if len(dataset) == 0:  # type: ignore[arg-type]
        return False
    first = dataset[0]
    x = first[0] if isinstance(first, tuple | list) else first
    return isinstance(x, torch.Tensor) and x.dim() != 1


def _bookkeeping_refuses_forward(model: nn.Module, loader: DataLoader[Any]) -> bool:
    """Whether book-keeping refuses ``model``'s forward pass, probed on zeros, not on records.

    The forward-pass refusals :func:`~fedsafe.training.bookkeeping.bookkeeping_refusal` cannot
    see without running the model: a layer applied twice, or to inputs that are not 2-D. Two
    records of zeros shaped like the dataset's first go through the wrapper's forward pass
    (no backward: no gradient is touched); no record's value is read, and the global RNG and
    the model's buffers are left as they were. A probe that fails otherwise is inconclusive:
    False (book-keeping's own refusal, e.g. of an output edited in place, then names the fix
    at the first step).
    """
    from fedsafe.errors import UserError
    from fedsafe.training.bookkeeping import BookkeepingModule

    dataset = loader.dataset
    if len(dataset) == 0:  # type: ignore[arg-type]
        return False
    first = dataset[0]
    x = first[0] if isinstance(first, tuple | list) else first
    params = list(model.parameters())
    if not isinstance(x, torch.Tensor) or not params:
        return False
    # Buffers (a BatchNorm's running statistics) are put back: the probe changes nothing.
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    wrapped = BookkeepingModule(model, 1.0)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            wrapped(torch.zeros((2, *x.shape), dtype=x.dtype, device=params[0].device))
    except UserError:
        return True
    except Exception:  # noqa: BLE001  # inconclusive, see above
        return False
    finally:
        wrapped._close()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return False


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    key: bytes | None = None,
    sample_rate: float | None = None,
    grad_sample_mode: str = "hooks",
) -> tuple[
    nn.Module,
    SecureNoiseDPOptimizer | SecureNoiseGhostDPOptimizer | SecureNoiseBookkeepingDPOptimizer,
    DataLoader,
    float,
]:
    """DP-SGD parts: per-sample gradients, clip-and-noise optimizer, Poisson loader.

    Built from Opacus's parts (``GradSampleModule``, ``DPOptimizer``) without its
    ``PrivacyEngine``, whose sampler and noise draw from a ``torch.Generator``: batches come
    from :class:`~fedsafe.training.secure_dp_sgd.SecurePoissonSampler` and noise from
    :class:`~fedsafe.training.secure_dp_sgd.SecureNoiseDPOptimizer`, both
    keyed with ``key`` (separate ChaCha20 streams). The engine's warning that its RNG is not
    secure therefore does not apply and is not raised.

    Parameters
    ----------
    model, optimizer
        The module to train and its optimizer over the module's parameters.
    loader
        A loader with the batch size to aim for; its dataset and collate function are kept,
        its sampling replaced. ``len(loader)`` batches make one pass.
    noise_multiplier, max_grad_norm
        Noise over clipping norm, > 0; clipping norm, > 0.
    key
        32 bytes. ``None`` (normal use): a fresh secret key from ``os.urandom``. An explicit key
        only for runs the site declares "not private".
    sample_rate
        The Poisson rate to sample with, from the site's *public* size; ``None`` samples at
        ``1 / len(loader)`` of the exact size (tests, benches). With it, the noisy sum is
        divided by the public expected batch size (``loader.batch_size``), not by
        ``n * sample_rate``, so the exact ``n`` shapes nothing that leaves.
    grad_sample_mode
        ``hooks`` (Opacus's ``GradSampleModule``), ``functorch`` (the same, every layer through
        ``torch.func``) or ``ghost`` (``GradSampleModuleFastGradientClipping`` with
        :class:`~fedsafe.training.secure_dp_sgd.SecureNoiseGhostDPOptimizer`: train it with
        :func:`private_backward`), ``bookkeeping``
        (:class:`~fedsafe.training.bookkeeping.BookkeepingModule` with
        :class:`~fedsafe.training.secure_dp_sgd.SecureNoiseBookkeepingDPOptimizer`, also through
        :func:`private_backward`; ``nn.Linear``-only models); ``auto`` resolves with
        :func:`~fedsafe.training.grad_sample_mode.choose_grad_sample_mode` (its bookkeeping
        becomes :func:`~fedsafe.training.grad_sample_mode.mode_for_sequences` when the
        loader's records are not vectors, e.g. sequences, or when the model's forward pass,
        probed on zeros, applies a layer twice). Sampling, noise,
        expected batch size and the returned rate are the same in every mode.

    Returns
    -------
    tuple
        The wrapped module, the optimizer, the Poisson loader and the rate it samples with
        (``1 / len(loader)``): account with it, not with ``batch_size / n``.

    Raises
    ------
    UserError
        If ``bookkeeping`` is asked for a model with a trainable layer that is not
        ``nn.Linear``.
    """
    # Opacus loads in seconds; only training needs it, not every ClientApp process.
    from opacus import GradSampleModule
    from opacus.data_loader import wrap_collate_with_empty
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.validators import ModuleValidator

    from fedsafe.training.bookkeeping import BookkeepingModule, check_bookkeeping_model
    from fedsafe.training.secure_dp_sgd import (
        SecureNoiseBookkeepingDPOptimizer,
        SecureNoiseDPOptimizer,
        SecureNoiseGhostDPOptimizer,
        SecurePoissonSampler,
    )

    mode = resolve_grad_sample_mode(grad_sample_mode, model, int(loader.batch_size or 1))
    ModuleValidator.validate(model, strict=True)
    if grad_sample_mode == "auto" and mode == "bookkeeping" and _records_not_vectors(loader):
        # Book-keeping takes (batch, features) inputs only; a Linear-only model applied to
        # sequences gets ghost clipping when large, else hooks.
        mode = mode_for_sequences(model, int(loader.batch_size or 1))
    elif (
        grad_sample_mode == "auto"
        and mode == "bookkeeping"
        and _bookkeeping_refuses_forward(model, loader)
    ):
        # A layer run twice or an output edited in place (ReLU(inplace=True)): book-keeping
        # would refuse at the first step, so ``auto`` does not pick it (docs/attacks/issue17c.md).
        mode = mode_for_sequences(model, int(loader.batch_size or 1))
    if mode == "bookkeeping":
        check_bookkeeping_model(model)
    round_key = fresh_key() if key is None else key
    dataset = loader.dataset
    n = len(dataset)  # type: ignore[arg-type]
    if sample_rate is None:
        steps = len(loader)
        sample_rate = 1.0 / steps
        # Opacus's int(n * sample_rate), in integers: the float product can fall just below
        # an integer (n = 49, batch 1 gives 0.999...) and make the mean divide by zero.
        expected_batch_size = max(1, n // steps)
    else:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        steps = max(1, round(1.0 / sample_rate))
        expected_batch_size = int(loader.batch_size or 1)
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=loader.collate_fn,
        sample_empty_shapes=[(0, *getattr(t, "shape", ())) for t in first],
        dtypes=[getattr(t, "dtype", type(t)) for t in first],
    )
    sampler = SecurePoissonSampler(
        n, sample_rate, steps, ChaCha20Random(round_key, SAMPLING_STREAM)
    )
    dp_loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
    optimizer_class: type[
        SecureNoiseDPOptimizer | SecureNoiseGhostDPOptimizer | SecureNoiseBookkeepingDPOptimizer
    ] = SecureNoiseDPOptimizer
    if mode == "ghost":
        optimizer_class = SecureNoiseGhostDPOptimizer
    elif mode == "bookkeeping":
        optimizer_class = SecureNoiseBookkeepingDPOptimizer
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        noise_rng=ChaCha20Random(round_key, NOISE_STREAM),
    )
    # Hooks last: a refused argument above leaves the caller's model untouched.
    dp_model: GradSampleModule | GradSampleModuleFastGradientClipping | BookkeepingModule
    if mode == "bookkeeping":
        dp_model = BookkeepingModule(model, max_grad_norm)
    elif mode == "ghost":
        dp_model = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm
        )
    else:
        dp_model = GradSampleModule(
            model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
        )
        dp_model.forbid_grad_accumulation()
    return dp_model, dp_optimizer, dp_loader, sample_rate


def private_backward(
    train_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: PerRecordLoss | None = None,
) -> torch.Tensor:
    """Forward and backward of one batch, leaving what ``optimizer.step()`` needs.

    With the ghost optimizer
    (:class:`~fedsafe.training.secure_dp_sgd.SecureNoiseGhostDPOptimizer`) this is Opacus's
    two-pass ghost clipping: the mean loss's backward fills each record's gradient norm,
    then the per-record losses reweighted by ``min(1, C / norm)`` are summed and
    back-propagated with the hooks off, so ``p.grad`` is the clipped sum. With the
    book-keeping wrapper (:class:`~fedsafe.training.bookkeeping.BookkeepingModule`) one
    backward pass to the layers' outputs and one weighted product per layer leave the
    clipped sum in ``p.grad``. Otherwise one backward of the mean loss fills Opacus's
    per-record gradients.

    ``loss`` is the per-record loss (default :func:`output_loss`).

    Returns
    -------
    torch.Tensor
        The batch's mean loss, detached.
    """
    from fedsafe.training.bookkeeping import BookkeepingModule
    from fedsafe.training.secure_dp_sgd import SecureNoiseGhostDPOptimizer

    if isinstance(train_model, BookkeepingModule):
        if len(x) == 0:
            # An empty Poisson batch: the clipped sum is zero (the noise is still added).
            train_model.clipped_backward(torch.zeros(0))
            return torch.zeros(())
        per_record = _per_record_loss(train_model, x, y, loss)
        train_model.clipped_backward(per_record)
        return per_record.mean().detach()
    with warnings.catch_warnings():
        # Opacus's per-sample hooks on inputs that need no gradient: expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if not isinstance(optimizer, SecureNoiseGhostDPOptimizer):
            mean = _loss(train_model, x, y, loss)
            mean.backward()
            return mean.detach()
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        if len(x) == 0:
            # An empty Poisson batch: the clipped sum is zero (the noise is still added). No
            # forward pass: ghost hooks count forwards per parameter and would take the next
            # one for parameter tying.
            for p in optimizer.params:
                p.grad = torch.zeros_like(p)
            return torch.zeros(())
        per_record = _per_record_loss(train_model, x, y, loss)
        DPTensorFastGradientClipping(train_model, optimizer, per_record, "mean").backward()
        return per_record.mean().detach()


def train_round(
    model: nn.Module,
    x: Records,
    y: Records,
    plan: TrainPlan,
    device: torch.device,
    key: bytes | None = None,
    loss: PerRecordLoss | None = None,
) -> PoissonGaussianEvent | None:
    """Train ``model`` in place for ``plan.local_steps`` steps (a site's round).

    The site's model is the run's global model, which the coordinator averages by parameter
    name, so it is not changed here: one that DP-SGD cannot train (BatchNorm) is refused with
    the fix (:func:`~fedsafe.training.model_check.check_model_for_dp`); the model factory
    fixes it for both sides (:func:`~fedsafe.training.model_check.dp_model_factory`).

    Parameters
    ----------
    model
        Trained in place, on ``device``.
    x, y
        The site's training records, shapes ``(n, ...)`` and ``(n,)``.
    plan
        Steps, batch size, learning rate and DP parameters.
    device
        Where to train (CPU or CUDA); the noise is drawn on the CPU and moved there.
    key
        32 bytes keying the batch sampling and the noise. ``None`` (normal use): a fresh
        secret key from ``os.urandom`` for this round. An explicit key makes the round
        reproducible by whoever knows it: only for runs the site declares "not private".
    loss
        Per-record loss (default :func:`output_loss`).

    Returns
    -------
    PoissonGaussianEvent or None
        The privacy event of this round (DP), with the sample rate used, or None for the
        non-private baseline.

    Raises
    ------
    UserError
        If ``plan.dp`` and the model has layers DP-SGD cannot train (the fix named).
    """
    if key is not None and len(key) != 32:
        raise ValueError(f"a reproducible key has 32 bytes, got {len(key)}")
    if plan.dp:
        check_model_for_dp(model, fix=False)
        seed = None
    elif key is None:
        seed = None
    else:
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    return train_in_place(model, x, y, plan, device, key=key, seed=seed, loss=loss)


def train_in_place(
    model: nn.Module,
    x: Records,
    y: Records,
    plan: TrainPlan,
    device: torch.device,
    *,
    key: bytes | None = None,
    seed: int | None = None,
    loss: PerRecordLoss | None = None,
) -> PoissonGaussianEvent | None:
    """The one loop: :func:`train_round` and :mod:`fedsafe.training.loop` train through it.

    DP (``plan.dp``): Poisson batches and noise keyed by ``key`` (``None``: fresh secret);
    the model must already pass Opacus's validator. Without DP: shuffled batches from a
    ``torch.Generator`` seeded with ``seed`` (``None``: unseeded), never for privacy.

    Returns
    -------
    PoissonGaussianEvent or None
        The event spent (DP), or None.
    """
    keep_freed_memory()
    model.to(device).train()
    global_params = [p.detach().clone() for p in model.parameters()]
    dataset = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    optimizer = _optimizer(model, plan)
    if plan.dp:
        dp_model, optimizer, loader, sample_rate = make_private(
            model,
            optimizer,
            DataLoader(dataset, batch_size=plan.batch_size),
            plan.noise_multiplier,
            plan.max_grad_norm,
            key,
            plan.sample_rate,
            plan.grad_sample_mode,
        )
        train_model: nn.Module = dp_model
    else:
        gen = torch.Generator()  # not for privacy: the non-private baseline's shuffling
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)  # not for privacy: the non-private baseline
        loader = DataLoader(
            dataset, batch_size=plan.batch_size, sampler=_Permutations(len(dataset), gen)
        )
        train_model = model
        sample_rate = 0.0
    try:
        steps = _run_steps(train_model, model, optimizer, loader, plan, global_params, device, loss)
    finally:
        if train_model is not model:
            # Opacus hooks stay on the wrapped module; remove them so the next round can wrap.
            train_model._close()  # type: ignore[operator]
    if not plan.dp:
        return None
    return PoissonGaussianEvent(sample_rate, plan.noise_multiplier, steps)


class _Permutations(Sampler[int]):
    """One ``randperm`` of the records per pass, from ``generator`` alone (not for privacy).

    Torch's ``RandomSampler`` draws a second permutation per pass and a loader given the
    generator draws a worker seed from it; this keeps the shuffling of FLamby's baselines.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self.generator).tolist()

    def __len__(self) -> int:
        return self.n


def _optimizer(model: nn.Module, plan: TrainPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=plan.lr)
    return torch.optim.SGD(model.parameters(), lr=plan.lr)


def _run_steps(
    train_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    plan: TrainPlan,
    global_params: list[torch.Tensor],
    device: torch.device,
    loss: PerRecordLoss | None = None,
) -> int:
    steps = 0
    while steps < plan.local_steps:
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if plan.dp:
                private_backward(train_model, optimizer, xb.to(device), yb.to(device), loss)
            else:
                _loss(train_model, xb.to(device), yb.to(device), loss).backward()
            optimizer.step()
            if plan.proximal_mu > 0:
                # The proximal gradient mu * (w - w_global) uses no record: applying it as a
                # separate step after the private one is post-processing.
                with torch.no_grad():
                    for p, g in zip(model.parameters(), global_params, strict=True):
                        p.sub_(plan.lr * plan.proximal_mu * (p - g))
            steps += 1
            if steps >= plan.local_steps:
                break
    return steps


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Metrics of a model on a labelled split."""

    loss: float
    accuracy: float
    roc_auc: float | None
    pr_auc: float | None
    num_examples: int


def model_outputs(model: nn.Module, x: Records, device: torch.device) -> torch.Tensor:
    """The model's outputs on ``x`` in evaluation mode, :data:`EVAL_CHUNK` records at a time.

    Larger chunks cost more in page faults for fresh activation buffers than they save in
    per-call overhead. The forward passes of a model built only of fedsafe's and torch's own
    modules run in ``torch.inference_mode`` (no autograd bookkeeping; the same values); the
    chunks are joined outside it, so the returned tensor is an ordinary one that callers may
    edit in place. Any other model (a task's own code) runs under ``torch.no_grad``: a tensor
    its forward caches while evaluated would otherwise be an inference tensor, which the
    site's DP round after the evaluation (evaluate-first) cannot use (attack17f).
    """
    xt = torch.as_tensor(x)
    model.to(device).eval()
    with torch.inference_mode() if _known_modules(model) else torch.no_grad():
        chunks = [model(xt[i : i + EVAL_CHUNK].to(device)) for i in range(0, len(xt), EVAL_CHUNK)]
    with torch.no_grad():
        return torch.cat(chunks)


def _known_modules(model: nn.Module) -> bool:
    """Whether every module of ``model`` is torch's or fedsafe's own (none caches tensors)."""
    return all(
        type(m).__module__.startswith(("torch.nn.", "fedsafe.models")) for m in model.modules()
    )


def evaluate_model(
    model: nn.Module,
    x: Records,
    y: Records,
    device: torch.device,
    loss: PerRecordLoss | None = None,
) -> EvalResult:
    """Loss and accuracy; for binary tasks also ROC AUC and PR AUC (None with one class).

    Binary accuracy uses threshold 0.5 (FLamby); multi-class accuracy the arg-max class.
    ``loss`` is the per-record loss averaged (default :func:`output_loss`).
    """
    return outputs_result(model_outputs(model, x, device), y, loss)


def outputs_result(
    outputs: torch.Tensor,
    y: Records,
    loss: PerRecordLoss | None = None,
) -> EvalResult:
    """:func:`evaluate_model`'s figures from the model's outputs on the records of ``y``."""
    yt = torch.as_tensor(y).to(outputs.device)
    with torch.no_grad():
        mean_loss = float((loss or output_loss)(outputs, yt).mean())
        if outputs.shape[-1] != 1:
            acc = float((outputs.argmax(dim=1) == yt.long()).float().mean())
            return EvalResult(mean_loss, acc, None, None, len(yt))
        prob = torch.sigmoid(outputs.reshape(-1)).cpu().numpy()
    labels = yt.cpu().numpy().astype(np.float32)
    acc = float(((prob >= 0.5).astype(np.float32) == labels).mean())
    both = len(np.unique(labels)) == 2
    # Only binary tasks need scikit-learn: importing it costs a worker seconds (issue 17).
    from sklearn.metrics import average_precision_score, roc_auc_score

    return EvalResult(
        loss=mean_loss,
        accuracy=acc,
        roc_auc=float(roc_auc_score(labels, prob)) if both else None,
        pr_auc=float(average_precision_score(labels, prob)) if both else None,
        num_examples=len(labels),
    )
