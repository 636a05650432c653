"""Membership-inference audit (loss-threshold attack, Yeom et al. 2018)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsafe.training.audit import TrainingSetup, loss_threshold_auc, membership_audit


def _pairwise_auc(members: np.ndarray, others: np.ndarray) -> float:
    lower = (members[:, None] < others[None, :]).sum()
    ties = (members[:, None] == others[None, :]).sum()
    return float((lower + 0.5 * ties) / (members.size * others.size))


def test_auc_extremes_and_ties() -> None:
    assert loss_threshold_auc([0.1, 0.2], [0.5, 0.9]) == 1.0
    assert loss_threshold_auc([0.5, 0.9], [0.1, 0.2]) == 0.0
    assert loss_threshold_auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        loss_threshold_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        loss_threshold_auc([np.nan], [1.0])


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(7)
    members = np.round(rng.exponential(0.5, 57), 1)  # rounding makes ties
    others = np.round(rng.exponential(1.0, 43), 1)
    assert loss_threshold_auc(members, others) == pytest.approx(_pairwise_auc(members, others))


def test_dp_model_leaks_less_than_the_same_model_without_dp(one_torch_thread: None) -> None:
    gen = torch.Generator().manual_seed(0)
    n, d = 100, 20
    # Random labels: the model can only memorise, so membership is all there is to learn.
    x = torch.randn(2 * n, d, generator=gen)
    y = torch.randint(0, 2, (2 * n,), generator=gen)

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 2))

    setup = TrainingSetup(
        epochs=40, batch_size=20, lr=0.2, noise_multiplier=4.0, accountant="rdp", seed=3
    )
    result = membership_audit(factory, x[:n], y[:n], x[n:], y[n:], setup)
    assert result.auc_no_dp > 0.75
    assert result.auc_dp < result.auc_no_dp - 0.1
    assert result.auc_dp < 0.7
    assert 0 < result.epsilon < 10
    assert result.steps == 40 * 5 and result.sample_rate == pytest.approx(0.2)
    assert result.to_dict()["n_members"] == n


def test_a_batchnorm_model_is_audited_as_its_groupnorm_fix_in_both_arms(
    one_torch_thread: None,
) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 6, generator=gen)
    y = (x[:, 0] > 0).float()
    built: list[nn.Module] = []

    def factory() -> nn.Module:
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        built.append(model)
        return model

    said: list[str] = []
    setup = TrainingSetup(epochs=1, batch_size=8, noise_multiplier=1.0, accountant="rdp")
    result = membership_audit(factory, x[:24], y[:24], x[24:], y[24:], setup, say=said.append)
    assert len(built) == 2 and len(said) == 1 and "BatchNorm1d -> GroupNorm" in said[0]
    assert result.steps == 3 and 0 <= result.auc_dp <= 1 and 0 <= result.auc_no_dp <= 1
