"""Models trained by fedsafe. DP-SGD models use no BatchNorm (it mixes records in a batch).

- ``logreg``: logistic regression, ``Linear(d, 1)`` on logits, FLamby's Fed-Heart-Disease model.
- ``mlp``: one hidden layer of 32 units with ReLU, for the lending scenario.
- ``mnist_cnn``: a small GroupNorm CNN (:class:`fedsafe.simulations.mnist_model.MnistCNN`).
"""

from __future__ import annotations

import torch
from torch import nn

MODEL_NAMES = ("logreg", "mlp", "mnist_cnn")


def build_model(name: str, num_features: int, seed: int) -> nn.Module:
    """Build a model with weights drawn from a generator seeded with ``seed``.

    Parameters
    ----------
    name
        ``"logreg"`` or ``"mlp"``.
    num_features
        Input width.
    seed
        Seed of the initial weights, so every site and the coordinator agree.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "logreg":
            return nn.Sequential(nn.Linear(num_features, 1))
        if name == "mnist_cnn":
            from fedsafe.simulations.mnist_model import MnistCNN

            return MnistCNN()
        return nn.Sequential(nn.Linear(num_features, 32), nn.ReLU(), nn.Linear(32, 1))
