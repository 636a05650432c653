"""Non-federated baselines for any task: a model factory, the sites' splits, a headline."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from fedsafe.data.site_data import SiteData
from fedsafe.models import build_model
from fedsafe.simulations.baselines import flamby_plan, local_baselines, pooled_baseline
from fedsafe.training import evaluate, train_non_private

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sites(classes: int) -> tuple[SiteData, ...]:
    rng = np.random.default_rng(11)
    sites = []
    for i, shift in enumerate((-0.5, 0.5)):
        x = rng.normal(shift, 1.0, size=(60, 3)).astype(np.float32)
        if classes == 2:
            y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
        else:
            y = np.digitize(x[:, 0], [-0.5, 0.5]).astype(np.int64)
        sites.append(SiteData(f"s{i}", x[:40], y[:40], x[40:], y[40:], ("a", "b", "c")))
    return tuple(sites)


def test_pooled_baseline_is_the_loop_trained_on_the_union() -> None:
    sites = _sites(2)
    factory = partial(build_model, "logreg", 3, 4)
    scores = pooled_baseline(factory, sites, "roc-auc", seed=5, epochs=30)
    x = np.concatenate([s.x_train for s in sites])
    y = np.concatenate([s.y_train for s in sites])
    model = train_non_private(factory(), x, y, flamby_plan(len(x), 30), seed=5)
    expected = {s.name: evaluate(model, s.x_test, s.y_test, ("roc-auc",))["roc-auc"] for s in sites}
    assert scores == expected
    assert all(v > 0.8 for v in scores.values())  # separable: the model learned


def test_local_baselines_for_a_multi_class_task_of_ones_own() -> None:
    sites = _sites(3)

    def factory() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))

    rows = local_baselines(factory, sites, "accuracy", seed=1, epochs=80)
    assert set(rows) == {"local s0", "local s1"}
    assert all(set(r) == {"s0", "s1"} for r in rows.values())
    # Well above a third (chance) on the site it trained on.
    assert rows["local s0"]["s0"] > 0.6 and rows["local s1"]["s1"] > 0.6


def test_an_unknown_headline_is_refused() -> None:
    with pytest.raises(ValueError, match="headline metric 'f1'"):
        pooled_baseline(partial(build_model, "logreg", 3, 0), _sites(2), "f1", seed=0)
