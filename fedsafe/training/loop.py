"""fedsafe's one training and evaluation loop, for any model: DP-SGD, plain, evaluated.

The site's rounds (:func:`fedsafe.training.dp_training.train_round`), the membership audit
(:mod:`fedsafe.training.audit`) and the non-federated baselines
(:mod:`fedsafe.simulations.baselines`) all train through
:func:`~fedsafe.training.dp_training.train_in_place`: DP-SGD (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016) with Opacus's clipping, Poisson batches and Gaussian noise from
ChaCha20 streams keyed from ``os.urandom``, or plain SGD/Adam on shuffled batches. What a task
supplies: a model (or a factory), its records as tensors or arrays, a
:class:`~fedsafe.training.dp_training.TrainPlan`, optionally its per-record loss and its
metrics. Nothing here knows a scenario.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedsafe.privacy.events import PoissonGaussianEvent
from fedsafe.training.dp_training import (
    PerRecordLoss,
    Records,
    TrainPlan,
    model_outputs,
    output_loss,
    outputs_result,
    train_in_place,
)
from fedsafe.training.model_check import check_model_for_dp, log

MetricFn = Callable[[NDArray[np.float64], NDArray[np.float64]], float]
"""``metric(labels, outputs)`` -> a number; ``outputs`` are the model's raw outputs."""

BUILTIN_METRICS = ("loss", "accuracy", "roc-auc", "pr-auc")
"""Metrics :func:`evaluate` computes by name (AUCs: one-logit binary models only)."""

CPU = torch.device("cpu")


def steps_for_epochs(num_records: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` passes: ``epochs * ceil(n / batch_size)``."""
    if num_records < 1 or batch_size < 1 or epochs < 1:
        raise ValueError("records, batch size and epochs must be >= 1")
    return epochs * math.ceil(num_records / batch_size)


def train_dp(
    model: nn.Module,
    x: Records,
    y: Records,
    plan: TrainPlan,
    *,
    device: torch.device = CPU,
    key: bytes | None = None,
    loss: PerRecordLoss | None = None,
    fix: bool = True,
    name: str = "the model",
    say: Callable[[str], None] | None = None,
) -> tuple[nn.Module, PoissonGaussianEvent]:
    """Train a model with DP-SGD; return it with the privacy event spent.

    Before training the model is checked with Opacus's validator
    (:func:`~fedsafe.training.model_check.check_model_for_dp`): BatchNorm is replaced by
    GroupNorm in a copy (``fix``), said in one line to ``say``, or refused with the fix.

    Parameters
    ----------
    model
        The model; trained in place when valid, else its fixed copy is trained.
    x, y
        Training records, shapes ``(n, ...)`` and ``(n,)``.
    plan
        Steps, batch size, learning rate, optimizer, noise multiplier and clipping norm;
        ``plan.dp`` must be True.
    device
        Where to train.
    key
        32 bytes keying sampling and noise; ``None`` (private use): fresh from ``os.urandom``.
    loss
        Per-record loss ``loss(outputs, y)`` of shape ``(batch,)``; default
        :func:`~fedsafe.training.dp_training.output_loss`.
    fix, name, say
        Whether a BatchNorm model may be fixed, how messages name it, where the note goes
        (default: the ``flwr.fedsafe.training`` log).

    Returns
    -------
    tuple
        The trained model (``model`` or its fixed copy) and its
        :class:`~fedsafe.privacy.events.PoissonGaussianEvent` (sample rate and steps used).

    Raises
    ------
    ValueError
        If ``plan.dp`` is False or the key is not 32 bytes.
    UserError
        If the model cannot be trained with DP-SGD (the fix named).
    """
    if not plan.dp:
        raise ValueError("train_dp needs a plan with dp=True; use train_non_private")
    if key is not None and len(key) != 32:
        raise ValueError(f"a reproducible key has 32 bytes, got {len(key)}")
    checked = check_model_for_dp(model, fix=fix, name=name)
    if checked.note:
        (say or log.warning)(checked.note)
    event = train_in_place(checked.model, x, y, plan, device, key=key, loss=loss)
    assert event is not None  # a DP plan always spends
    return checked.model, event


def train_non_private(
    model: nn.Module,
    x: Records,
    y: Records,
    plan: TrainPlan,
    *,
    device: torch.device = CPU,
    seed: int | None = None,
    loss: PerRecordLoss | None = None,
) -> nn.Module:
    """Train a model without DP (the DP fields of ``plan`` are ignored), in place.

    Batches are shuffled with a ``torch.Generator`` seeded with ``seed`` (``None``: unseeded);
    nothing of it protects privacy: for baselines and audits only, never a site's release.

    Returns
    -------
    nn.Module
        ``model``, trained.
    """
    plain = dataclasses.replace(plan, dp=False) if plan.dp else plan
    train_in_place(model, x, y, plain, device, seed=seed, loss=loss)
    return model


def evaluate(
    model: nn.Module,
    x: Records,
    y: Records,
    metrics: Sequence[str] | Mapping[str, MetricFn] = BUILTIN_METRICS,
    *,
    device: torch.device = CPU,
    loss: PerRecordLoss | None = None,
) -> dict[str, float | None]:
    """The model's metrics on labelled records.

    Parameters
    ----------
    model
        Evaluated in ``eval`` mode, :data:`~fedsafe.training.dp_training.EVAL_CHUNK` records
        per forward pass.
    x, y
        Records and labels, shapes ``(n, ...)`` and ``(n,)``.
    metrics
        Names from :data:`BUILTIN_METRICS` (``loss`` averages ``loss``; ``accuracy`` thresholds
        one logit at 0.5 or takes the arg-max class; ``roc-auc``/``pr-auc`` for one-logit
        binary models), or a mapping of the task's own names to ``metric(labels, outputs)``
        functions (labels and raw outputs as float64 arrays).
    device
        Where to run the model.
    loss
        Per-record loss for ``loss`` (default
        :func:`~fedsafe.training.dp_training.output_loss`).

    Returns
    -------
    dict
        Each requested name to its value; ``None`` where undefined (an AUC with one class or
        for a multi-class model).

    Raises
    ------
    ValueError
        If a metric name is neither built in nor given a function.
    """
    if not isinstance(metrics, Mapping):
        unknown = [m for m in metrics if m not in BUILTIN_METRICS]
        if unknown:
            raise ValueError(
                f"unknown metric(s) {', '.join(unknown)}; built in: {', '.join(BUILTIN_METRICS)} "
                "(pass a mapping of names to functions for others)"
            )
    outputs = model_outputs(model, x, device)
    if isinstance(metrics, Mapping):
        labels = torch.as_tensor(y).detach().double().cpu().numpy()
        raw = outputs.detach().double().cpu().numpy()
        return {name: float(fn(labels, raw)) for name, fn in metrics.items()}
    result = outputs_result(outputs, y, loss)
    builtin: dict[str, float | None] = {
        "loss": result.loss,
        "accuracy": result.accuracy,
        "roc-auc": result.roc_auc,
        "pr-auc": result.pr_auc,
    }
    return {name: builtin[name] for name in metrics}


def per_record_losses(
    model: nn.Module,
    x: Records,
    y: Records,
    *,
    device: torch.device = CPU,
    loss: PerRecordLoss | None = None,
) -> NDArray[np.float64]:
    """The model's loss on each record, shape ``(n,)``.

    ``loss`` is the per-record loss (default :func:`~fedsafe.training.dp_training.output_loss`).
    """
    outputs = model_outputs(model, x, device)
    with torch.no_grad():
        values = (loss or output_loss)(outputs, torch.as_tensor(y).to(outputs.device))
    return values.detach().double().cpu().numpy().reshape(-1)
