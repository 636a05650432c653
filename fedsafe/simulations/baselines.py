"""Non-federated baselines, as in FLamby: pooled training sets, or each site alone.

Both are evaluated on every site's test split with the task's headline metric. They train
through fedsafe's one loop (:func:`fedsafe.training.loop.train_non_private`, no DP) and score
with its :func:`~fedsafe.training.loop.evaluate`, so any task works: the caller gives the model
factory, the sites' splits, the headline metric and optionally the per-record loss.

FLamby's protocol (du Terrail et al., NeurIPS 2022): Adam, learning rate 1e-3, 50 epochs,
batch size 4, no DP (:func:`flamby_plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
from torch import nn

from fedsafe.data.site_data import SiteData
from fedsafe.models import build_model
from fedsafe.tasks.scenarios import Scenario
from fedsafe.training.dp_training import PerRecordLoss, TrainPlan
from fedsafe.training.loop import (
    BUILTIN_METRICS,
    evaluate,
    steps_for_epochs,
    train_non_private,
)

ModelFactory = Callable[[], nn.Module]
"""Builds a fresh model with the task's seeded initial weights."""

FLAMBY_BATCH_SIZE = 4
FLAMBY_LR = 1e-3


def baseline_task(scenario: Scenario, seed: int) -> tuple[ModelFactory, tuple[SiteData, ...], str]:
    """A shipped scenario's model factory (weights from ``seed``), sites and headline metric."""
    factory = partial(build_model, scenario.model, scenario.num_features, seed)
    return factory, scenario.sites, scenario.headline_metric


def flamby_plan(num_records: int, epochs: int = 50) -> TrainPlan:
    """FLamby's baseline training: Adam at 1e-3, batch 4, ``epochs`` passes, no DP."""
    return TrainPlan(
        local_steps=steps_for_epochs(num_records, FLAMBY_BATCH_SIZE, epochs),
        batch_size=FLAMBY_BATCH_SIZE,
        lr=FLAMBY_LR,
        dp=False,
        optimizer="adam",
    )


def _check_headline(headline_metric: str) -> None:
    if headline_metric not in BUILTIN_METRICS:
        raise ValueError(
            f"headline metric {headline_metric!r} is not one of {', '.join(BUILTIN_METRICS)}"
        )


def _score(
    model: nn.Module,
    sites: Sequence[SiteData],
    headline_metric: str,
    loss: PerRecordLoss | None,
) -> dict[str, float]:
    out = {}
    for site in sites:
        value = evaluate(model, site.x_test, site.y_test, (headline_metric,), loss=loss)
        figure = value[headline_metric]
        out[site.name] = float(figure if figure is not None else float("nan"))
    return out


def pooled_baseline(
    model_factory: ModelFactory,
    sites: Sequence[SiteData],
    headline_metric: str,
    seed: int,
    epochs: int = 50,
    loss: PerRecordLoss | None = None,
) -> dict[str, float]:
    """Train on the union of the sites' training splits; score on each site's test split.

    Parameters
    ----------
    model_factory
        Builds the task's model (seeded weights).
    sites
        Every site's training and test split.
    headline_metric
        A built-in metric name of :func:`~fedsafe.training.loop.evaluate` (``accuracy``,
        ``roc-auc``, ...); NaN where undefined on a site's test split.
    seed
        Seed of the batch shuffling (not for privacy: no DP here).
    epochs
        Passes over the pooled records (:func:`flamby_plan`).
    loss
        The task's per-record loss (default: fedsafe's by output width).

    Returns
    -------
    dict
        Site name to the headline metric on its test split.
    """
    _check_headline(headline_metric)
    x = np.concatenate([s.x_train for s in sites])
    y = np.concatenate([s.y_train for s in sites])
    model = train_non_private(
        model_factory(), x, y, flamby_plan(len(x), epochs), seed=seed, loss=loss
    )
    return _score(model, sites, headline_metric, loss)


def local_baselines(
    model_factory: ModelFactory,
    sites: Sequence[SiteData],
    headline_metric: str,
    seed: int,
    epochs: int = 50,
    loss: PerRecordLoss | None = None,
) -> dict[str, dict[str, float]]:
    """For each site, train on it alone; score on every site's test split.

    Parameters are those of :func:`pooled_baseline`.

    Returns
    -------
    dict
        ``"local <site>"`` to the per-site scores of the model trained at that site alone.
    """
    _check_headline(headline_metric)
    rows = {}
    for site in sites:
        model = train_non_private(
            model_factory(),
            site.x_train,
            site.y_train,
            flamby_plan(len(site.x_train), epochs),
            seed=seed,
            loss=loss,
        )
        rows[f"local {site.name}"] = _score(model, sites, headline_metric, loss)
    return rows
