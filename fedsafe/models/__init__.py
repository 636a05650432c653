"""Models trained by fedsafe. DP-SGD models use no BatchNorm (it mixes records in a batch).

- ``logreg``: logistic regression, ``Linear(d, 1)`` on logits, FLamby's Fed-Heart-Disease model.
- ``mlp``: one hidden layer of 32 units with ReLU, for the lending scenario.
- ``mnist_cnn``: a small GroupNorm CNN (:class:`fedsafe.models.mnist_cnn.MnistCNN`).

A bring-your-own schema names its model (:mod:`fedsafe.data.schema`) as ``logreg`` or
``mlp-H1-H2-...`` (hidden widths), with ``/K`` appended for a ``K``-class label (``K`` logits,
softmax cross-entropy); without it the model has one logit (binary cross-entropy).
"""

from __future__ import annotations

import re

import torch
from torch import nn

MODEL_NAMES = ("logreg", "mlp", "mnist_cnn")
#: ``logreg``, ``mlp`` or ``mlp-64-32``, optionally followed by ``/K`` classes.
_MODEL_NAME = re.compile(r"^(logreg|mlp(?:-[1-9]\d*)*|mnist_cnn)(?:/([3-9]|[1-9]\d+))?$")


def parse_model_name(name: str) -> tuple[str, tuple[int, ...], int]:
    """Split a model name into its family, hidden widths and number of outputs.

    Raises
    ------
    ValueError
        If ``name`` is not a model fedsafe builds.
    """
    match = _MODEL_NAME.match(name)
    if match is None:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} "
            "(or mlp-H1-H2 with hidden widths, /K for K classes)"
        )
    base, classes = match.group(1), match.group(2)
    family, *widths = base.split("-")
    hidden = tuple(int(w) for w in widths) or ((32,) if family == "mlp" else ())
    return family, hidden, int(classes) if classes else 1


def build_model(name: str, num_features: int, seed: int) -> nn.Module:
    """Build a model with weights drawn from a generator seeded with ``seed``.

    Parameters
    ----------
    name
        ``"logreg"``, ``"mlp"``, ``"mnist_cnn"``, or a schema's model name such as
        ``"mlp-64-32"`` or ``"logreg/3"`` (see the module docstring).
    num_features
        Input width.
    seed
        Seed of the initial weights, so every site and the coordinator agree.

    Raises
    ------
    ValueError
        If ``name`` is not a model fedsafe builds.
    """
    family, hidden, outputs = parse_model_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "mnist_cnn":
            from fedsafe.models.mnist_cnn import MnistCNN

            return MnistCNN()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, outputs))
