"""Empirical privacy check: a membership-inference audit with the loss-threshold attack.

The attack of Yeom, Giacomelli, Fredrikson and Jha, "Privacy Risk in Machine Learning:
Analyzing the Connection to Overfitting", IEEE CSF 2018, guesses that a record was in the
training set when the model's loss on it is low. Sweeping the threshold gives a ROC curve; its
AUC is 0.5 for a model that leaks nothing about membership and 1.0 for one that reveals it.
DP bounds the attack's advantage (true-positive rate <= e^epsilon * false-positive rate +
delta; Humphries et al. 2023, Thm. 1), so a DP model should score near 0.5 where the same
model trained without DP scores well above it.

The driver is generic: the caller supplies the model factory, tensors (members = training
records, non-members = held-out records from the same distribution), the training parameters
and optionally the task's per-record loss. Both models train through fedsafe's one loop
(:mod:`fedsafe.training.loop`), the DP one exactly as a site trains (Opacus clipping, secret
Poisson sampling and noise). An audit is evidence, not a proof; the guarantee comes from the
accountant.

Why it lives in ``fedsafe.training``: it trains models, so it sits on the training layer (it
was in ``fedsafe.privacy``, a lower layer, and had to reach up into training).

What it releases: its figures (attack AUCs, record counts) are exact functions of the records it
trains on, outside any ledger. ``fedsafe privacy audit`` therefore runs where its user holds
the records (shipped public scenarios, or a task's own data), prints its result where it runs,
and writes it into a run folder (where the run report picks it up) only when its user exports
it with ``--run``; no site handler calls it, and nothing of it is in a site's replies
(:mod:`fedsafe.privacy.releases`).
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

from fedsafe.privacy.accounting import epsilon
from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.training.dp_training import PerRecordLoss, TrainPlan
from fedsafe.training.loop import (
    Records,
    per_record_losses,
    steps_for_epochs,
    train_dp,
    train_non_private,
)
from fedsafe.training.model_check import dp_model_factory


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
        Seed of the initial weights and of the non-DP model's shuffling. The DP model's
        sampling and noise come from fresh secret keys, as at a site.
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
        self.plan(1)  # the loop's own checks (clipping norm range)

    def plan(self, num_records: int) -> TrainPlan:
        """The DP plan for ``num_records`` members: ``epochs`` passes at rate ``1/batches``.

        The Poisson rate is left to the loop: ``1 / ceil(n / batch_size)`` of the exact size,
        which an audit (run by whoever holds the records) may use.
        """
        return TrainPlan(
            local_steps=steps_for_epochs(num_records, self.batch_size, self.epochs),
            batch_size=self.batch_size,
            lr=self.lr,
            dp=True,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
        )


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


def train_model(
    model: nn.Module,
    x: Records,
    y: Records,
    setup: TrainingSetup,
    *,
    dp: bool,
    loss: PerRecordLoss | None = None,
) -> tuple[nn.Module, PoissonGaussianEvent | None]:
    """Train ``model`` as ``setup`` says, with DP-SGD when ``dp`` (:mod:`fedsafe.training.loop`).

    Without DP the batches are shuffled from ``setup.seed`` (not for privacy); with DP they are
    Poisson-sampled and noised from fresh secret keys, as at a site.

    Returns
    -------
    tuple
        The trained module (a fixed copy if the model had BatchNorm) and the DP event, or
        ``None`` without DP.
    """
    plan = setup.plan(len(x))
    if dp:
        return train_dp(model, x, y, plan, loss=loss)
    return train_non_private(model, x, y, plan, seed=setup.seed, loss=loss), None


def membership_audit(
    model_factory: Callable[[], nn.Module],
    x_members: Records,
    y_members: Records,
    x_nonmembers: Records,
    y_nonmembers: Records,
    setup: TrainingSetup | None = None,
    loss: PerRecordLoss | None = None,
    say: Callable[[str], None] | None = None,
) -> AuditResult:
    """Train a DP and a non-DP model the same way and attack both (Yeom et al. 2018).

    Parameters
    ----------
    model_factory
        Builds a fresh model; called once per model, after seeding torch with ``setup.seed``,
        so both models start from the same weights. A model with BatchNorm is fixed to
        GroupNorm for both (said once to ``say``), so both arms train the same architecture.
    x_members, y_members
        The site's training records (the attack's "in" set), shapes ``(n, ...)``, ``(n,)``.
    x_nonmembers, y_nonmembers
        Held-out records from the same distribution (the "out" set).
    setup
        Training and DP parameters shared by both models.
    loss
        The task's per-record loss ``loss(outputs, y)`` (shape ``(batch,)``); default
        :func:`~fedsafe.training.dp_training.output_loss` (binary cross-entropy on one logit,
        cross-entropy over classes). Training averages it; the attack thresholds it.
    say
        Where the model check's one-line note goes (default: the training log).

    Returns
    -------
    AuditResult
        Both AUCs and the DP model's (epsilon, delta).

    Raises
    ------
    UserError
        If the model cannot be trained with DP-SGD even after Opacus's fixes.
    """
    setup = setup or TrainingSetup()
    build = dp_model_factory(model_factory, say=say)
    aucs: dict[bool, float] = {}
    dp_event: PoissonGaussianEvent | None = None
    for dp in (False, True):
        torch.manual_seed(setup.seed)  # not for privacy: the same public initial model
        model, event = train_model(build(), x_members, y_members, setup, dp=dp, loss=loss)
        if dp:
            dp_event = event
        aucs[dp] = loss_threshold_auc(
            per_record_losses(model, x_members, y_members, loss=loss),
            per_record_losses(model, x_nonmembers, y_nonmembers, loss=loss),
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
