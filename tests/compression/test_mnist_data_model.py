from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsafe.data.mnist import load_mnist, mnist_path
from fedsafe.data.partition import dirichlet_label_partition, iid_partition
from fedsafe.models.mnist_cnn import MnistCNN


def _covers(parts, n):
    joined = np.concatenate(parts)
    assert joined.size == n and np.unique(joined).size == n


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 30),
    st.floats(0.05, 100.0),
    st.integers(0, 2**31),
    st.integers(60, 400),
)
def test_dirichlet_partition_covers_nonempty_deterministic(num_sites, alpha, seed, n):
    labels = np.random.default_rng(1).integers(0, 10, n)
    parts = dirichlet_label_partition(labels, num_sites, alpha, np.random.default_rng(seed))
    assert len(parts) == num_sites and all(p.size >= 1 for p in parts)
    _covers(parts, n)
    again = dirichlet_label_partition(labels, num_sites, alpha, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 50), st.integers(0, 2**31))
def test_iid_partition(num_sites, seed):
    labels = np.arange(500) % 10
    parts = iid_partition(labels, num_sites, np.random.default_rng(seed))
    _covers(parts, 500)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_small_alpha_is_skewed_and_100_sites_work():
    labels = np.arange(6000) % 10
    skewed = dirichlet_label_partition(labels, 10, 0.1, np.random.default_rng(0))
    near_iid = dirichlet_label_partition(labels, 10, 1000.0, np.random.default_rng(0))

    def mean_classes(parts):
        return np.mean([np.unique(labels[p]).size for p in parts])

    assert mean_classes(skewed) < mean_classes(near_iid)
    hundred = dirichlet_label_partition(labels, 100, 0.5, np.random.default_rng(0))
    assert len(hundred) == 100 and min(p.size for p in hundred) >= 1


def test_partition_errors():
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_partition(np.zeros(10, int), 2, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="non-empty"):
        iid_partition(np.zeros(3, int), 5, np.random.default_rng(0))


def test_embedded_mnist_loads():
    assert "fedsafe" in str(mnist_path()) and mnist_path().is_file()
    data = load_mnist()
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert set(np.unique(data.y_train)) == set(range(10))
    assert abs(float(data.x_train[:5000].mean())) < 0.1


def test_cnn_is_small_and_opacus_valid():
    from opacus.validators import ModuleValidator

    model = MnistCNN()
    params = sum(p.numel() for p in model.parameters())
    assert 20_000 <= params <= 30_000
    assert ModuleValidator.validate(model, strict=False) == []
    ModuleValidator.validate(model, strict=True)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
