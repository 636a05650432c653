"""A 4x512 MLP on MNIST: a model big enough for a GPU to matter (issue 17's CUDA federation).

Site ``i`` of ``n`` takes every ``n``-th MNIST training record (a public rule) and keeps 15% as
its test split; pixels are normalized with public constants (``load_mnist``). The model is
the 4x512 MLP of ``bench/speed.py`` with MNIST's 784 inputs: 784-512-512-512-10, 932,362
parameters. Used by ``bench/gpu_federation.py`` as ``--task gpu_mlp_task:task``.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsafe import SiteData, SiteRef, Task, TaskDefaults
from fedsafe.data.mnist import load_mnist


def load(site: SiteRef) -> SiteData:
    """Site ``site.index``'s share of MNIST: every ``num_sites``-th record, 85% train."""
    data = load_mnist()
    index, count = max(site.index, 0), max(site.num_sites, 1)
    x = data.x_train[index::count].reshape(-1, 784)
    y = data.y_train[index::count]
    cut = int(0.85 * len(x))
    return SiteData(site.name or f"site-{index}", x[:cut], y[:cut], x[cut:], y[cut:], ("pixels",))


def model(num_features: int, generator: torch.Generator) -> nn.Module:
    """784-512-512-512-10 with ReLU; fedsafe seeds ``generator`` and torch's with the run seed."""
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10),
    )  # fmt: skip


task = Task(
    "mnist-mlp-4x512",
    load,
    model,
    metrics=("loss", "accuracy"),
    headline="accuracy",
    defaults=TaskDefaults(batch_size=256, local_steps=20, lr=0.1, max_grad_norm=1.0),
)
