"""Non-federated baselines, as in FLamby: pooled training sets, or each site alone.

Both are evaluated on every site's test split with the scenario's headline metric.

FLamby's protocol (du Terrail et al., NeurIPS 2022): Adam, learning rate 1e-3, 50 epochs,
batch size 4, no DP.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedsafe.models import build_model
from fedsafe.tasks.scenarios import Scenario
from fedsafe.training.dp_training import evaluate_model


def _fit(
    model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, epochs: int, batch_size: int = 4
) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(xt[idx]).reshape(-1), yt[idx]
            )
            loss.backward()
            opt.step()
    return model


def _score(model: nn.Module, scenario: Scenario) -> dict[str, float]:
    out = {}
    for site in scenario.sites:
        r = evaluate_model(model, site.x_test, site.y_test, torch.device("cpu"))
        value = r.accuracy if scenario.headline_metric == "accuracy" else r.roc_auc
        out[site.name] = float(value if value is not None else float("nan"))
    return out


def pooled_baseline(scenario: Scenario, seed: int, epochs: int = 50) -> dict[str, float]:
    """Train on the union of the sites' training splits; score on each site's test split."""
    x = np.concatenate([s.x_train for s in scenario.sites])
    y = np.concatenate([s.y_train for s in scenario.sites])
    model = build_model(scenario.model, scenario.num_features, seed)
    return _score(_fit(model, x, y, seed, epochs), scenario)


def local_baselines(scenario: Scenario, seed: int, epochs: int = 50) -> dict[str, dict[str, float]]:
    """For each site, train on it alone; score on every site's test split."""
    rows = {}
    for site in scenario.sites:
        model = build_model(scenario.model, scenario.num_features, seed)
        rows[f"local {site.name}"] = _score(
            _fit(model, site.x_train, site.y_train, seed, epochs), scenario
        )
    return rows
