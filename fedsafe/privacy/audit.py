"""Empirical privacy check: a membership-inference audit with the loss-threshold attack.

The attack of Yeom, Giacomelli, Fredrikson and Jha, "Privacy Risk in Machine Learning:
Analyzing the Connection to Overfitting", IEEE CSF 2018, guesses that a record was in the
training set when the model's loss on it is low. Sweeping the threshold gives a ROC curve; its
AUC is 0.5 for a model that leaks nothing about membership and 1.0 for one that reveals it.
DP bounds the attack's advantage (true-positive rate <= e^epsilon * false-positive rate +
delta; Humphries et al. 2023, Thm. 1), so a DP model should score near 0.5 where the same
model trained without DP scores well above it.

The driver is generic: the caller supplies the model factory and tensors (members = training
records, non-members = held-out records from the same distribution). An audit is evidence, not
a proof; the guarantee comes from the accountant.

What it releases: its figures (attack AUCs, record counts) are exact functions of the records it
trains on, outside any ledger. ``fedsafe privacy audit`` therefore runs only on the shipped,
public scenarios, prints its result where it runs, and writes it into a run folder (where the
run report picks it up) only when its user exports it with ``--run``; no site handler calls it,
and nothing of it is in a site's replies (:mod:`fedsafe.privacy.releases`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_threshold_auc(losses_members: npt.ArrayLike, losses_nonmembers: npt.ArrayLike) -> float:
    """AUC of the loss-threshold membership attack (Yeom et al. 2018).

    Equals the probability that a random member has a lower loss than a random non-member,
    ties counting one half (the Mann-Whitney U statistic divided by ``n_members *
    n_nonmembers``), i.e. the area under the ROC curve over all thresholds.

    Parameters
    ----------
    losses_members
        Per-record losses of the model on its training records.
    losses_nonmembers
        Per-record losses on held-out records.

    Returns
    -------
    float
        AUC in [0, 1]; 0.5 means no membership signal.
    """
    members = np.asarray(losses_members, dtype=np.float64).ravel()
    others = np.asarray(losses_nonmembers, dtype=np.float64).ravel()
    if members.size == 0 or others.size == 0:
        raise ValueError("need at least one member loss and one non-member loss")
    if not (np.isfinite(members).all() and np.isfinite(others).all()):
        raise ValueError("losses must be finite")
    # Rank of each member among all losses, ties averaged; lower loss = stronger "member".
    everything = np.concatenate([members, others])
    order = np.argsort(everything, kind="mergesort")
    ranks = np.empty(everything.size, dtype=np.float64)
    sorted_vals = everything[order]
    start = 0
    while start < sorted_vals.size:
        stop = start
        while stop + 1 < sorted_vals.size and sorted_vals[stop + 1] == sorted_vals[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    # U counts pairs (member, non-member) where the member's loss is *higher*.
    u_higher = ranks[: members.size].sum() - members.size * (members.size + 1) / 2
    return float(1.0 - u_higher / (members.size * others.size))


@dataclass(frozen=True, slots=True)
class TrainingSetup:
    """How both audited models are trained (identically but for DP).

    Parameters
    ----------
    epochs
        Passes over the training records.
    batch_size
        Expected batch size (Poisson sampling with rate ``batch_size / n`` under DP).
    lr
        SGD learning rate.
    noise_multiplier
        Noise multiplier of the DP model.
    max_grad_norm
        Per-example clipping norm of the DP model.
    delta
        Delta at which the DP model's epsilon is reported.
    accountant
        Accountant for that epsilon.
    seed
        Seed of every random draw (initialisation, sampling, noise).
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.1
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "prv"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not (self.lr > 0 and self.noise_multiplier > 0 and self.max_grad_norm > 0):
            raise ValueError("lr, noise_multiplier and max_grad_norm must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True, slots=True)
class AuditResult:
    """Membership-inference AUCs of a DP model and of the same model trained without DP.

    Parameters
    ----------
    auc_dp, auc_no_dp
        Loss-threshold attack AUC against each model.
    epsilon, delta, accountant
        The DP model's guarantee.
    noise_multiplier, max_grad_norm, sample_rate, steps
        The DP mechanism.
    n_members, n_nonmembers
        Records on each side of the audit.
    """

    auc_dp: float
    auc_no_dp: float
    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    n_members: int
    n_nonmembers: int

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a plain dictionary (``audit.json`` in a run folder)."""
        return asdict(self)


def per_example_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None = None
) -> npt.NDArray[np.float64]:
    """Loss of ``model`` on each record (``loss_fn`` must use ``reduction="none"``)."""
    fn = loss_fn or nn.CrossEntropyLoss(reduction="none")
    model.eval()
    with torch.no_grad():
        losses = fn(model(x), y)
    return losses.detach().double().cpu().numpy().reshape(-1)


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    setup: TrainingSetup,
    *,
    dp: bool,
    loss_fn: LossFn | None = None,
) -> tuple[nn.Module, PoissonGaussianEvent | None]:
    """Train ``model`` with SGD, with DP-SGD (Opacus, Poisson sampling) when ``dp``.

    Returns
    -------
    tuple
        The trained module (unwrapped from Opacus) and the DP event, or ``None`` without DP.
    """
    # not for privacy: shuffles the non-DP arm only; make_private replaces the sampling.
    generator = torch.Generator().manual_seed(setup.seed)  # not for privacy
    criterion = loss_fn or nn.CrossEntropyLoss()
    loader = DataLoader(
        TensorDataset(x, y), batch_size=setup.batch_size, shuffle=True, generator=generator
    )
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=setup.lr)
    trained: nn.Module = model
    event = None
    if dp:
        from fedsafe.training.dp_training import make_private

        trained, optimizer, loader, sample_rate = make_private(
            model,
            optimizer,
            loader,
            setup.noise_multiplier,
            setup.max_grad_norm,
        )
        event = PoissonGaussianEvent(
            sample_rate, setup.noise_multiplier, setup.epochs * len(loader)
        )
    trained.train()
    for _ in range(setup.epochs):
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            optimizer.zero_grad()
            criterion(trained(xb), yb).backward()
            optimizer.step()
    module = getattr(trained, "_module", trained)
    return module, event


def membership_audit(
    model_factory: Callable[[], nn.Module],
    x_members: torch.Tensor,
    y_members: torch.Tensor,
    x_nonmembers: torch.Tensor,
    y_nonmembers: torch.Tensor,
    setup: TrainingSetup | None = None,
    loss_fn: Callable[[], LossFn] | None = None,
) -> AuditResult:
    """Train a DP and a non-DP model the same way and attack both (Yeom et al. 2018).

    Parameters
    ----------
    model_factory
        Builds a fresh model; called once per model, after seeding torch with ``setup.seed``,
        so both models start from the same weights.
    x_members, y_members
        The site's training records (the attack's "in" set).
    x_nonmembers, y_nonmembers
        Held-out records from the same distribution (the "out" set).
    setup
        Training and DP parameters shared by both models.
    loss_fn
        Builds the per-record loss (``reduction="none"``); default cross-entropy. Training
        uses the same loss with mean reduction.

    Returns
    -------
    AuditResult
        Both AUCs and the DP model's (epsilon, delta).
    """
    setup = setup or TrainingSetup()
    aucs: dict[bool, float] = {}
    dp_event: PoissonGaussianEvent | None = None
    for dp in (False, True):
        torch.manual_seed(setup.seed)  # not for privacy: the same public initial model
        per_record = loss_fn() if loss_fn else nn.CrossEntropyLoss(reduction="none")

        def mean_loss(out: torch.Tensor, target: torch.Tensor, fn: LossFn = per_record) -> Any:
            return fn(out, target).mean()

        model, event = train_model(
            model_factory(), x_members, y_members, setup, dp=dp, loss_fn=mean_loss
        )
        if dp:
            dp_event = event
        aucs[dp] = loss_threshold_auc(
            per_example_losses(model, x_members, y_members, per_record),
            per_example_losses(model, x_nonmembers, y_nonmembers, per_record),
        )
    assert dp_event is not None
    eps = epsilon([dp_event], setup.delta, setup.accountant)
    return AuditResult(
        auc_dp=aucs[True],
        auc_no_dp=aucs[False],
        epsilon=eps if math.isfinite(eps) else float("inf"),
        delta=setup.delta,
        accountant=setup.accountant,
        noise_multiplier=setup.noise_multiplier,
        max_grad_norm=setup.max_grad_norm,
        sample_rate=dp_event.sample_rate,
        steps=dp_event.steps,
        n_members=len(x_members),
        n_nonmembers=len(x_nonmembers),
    )
