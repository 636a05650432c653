"""The project's task: its own PyTorch model (a small GroupNorm ResNet), data, loss, metrics.

fedsafe imports ``task`` by its path, ``own_model.task:task``; nothing here is fedsafe's
model. Each site's records are its share of MNIST (shipped with fedsafe): site ``i`` of ``n``
takes every ``n``-th record, at most ``RECORDS_PER_SITE`` of them (a public constant), and
keeps 15% as its test split.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsafe import SiteData, SiteRef, Task, TaskDefaults
from fedsafe.data.mnist import load_mnist

#: Records per site (public): small enough for a CPU run in seconds.
RECORDS_PER_SITE = 600


class Block(nn.Module):
    """A residual block: two 3x3 convolutions with GroupNorm (per record, DP-SGD-safe)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x + f(x))``, shape kept."""
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(out)))


class SmallResNet(nn.Module):
    """Stem, two residual blocks, global average pooling, 10 logits. Input ``(n, 1, 28, 28)``."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, 10)`` of ``n`` images (flat or ``(n, 1, 28, 28)``)."""
        x = self.blocks(self.stem(x.reshape(-1, 1, 28, 28)))
        return self.head(x.mean(dim=(2, 3)))


def load(site: SiteRef) -> SiteData:
    """Site ``site.index``'s share of MNIST: every ``num_sites``-th record, 85% train."""
    data = load_mnist()
    index, count = max(site.index, 0), max(site.num_sites, 1)
    x = data.x_train[index::count][:RECORDS_PER_SITE]
    y = data.y_train[index::count][:RECORDS_PER_SITE]
    cut = int(0.85 * len(x))
    return SiteData(site.name or f"site-{index}", x[:cut], y[:cut], x[cut:], y[cut:], ("pixels",))


def model(num_features: int, generator: torch.Generator) -> nn.Module:
    """The initial model; fedsafe seeds ``generator`` (and torch's) with the run's seed."""
    return SmallResNet()


def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-record cross-entropy, shape ``(batch,)``."""
    return nn.functional.cross_entropy(logits, y.long(), reduction="none")


task = Task(
    "own-resnet",
    load,
    model,
    loss=loss,
    metrics=("loss", "accuracy"),
    headline="accuracy",
    defaults=TaskDefaults(batch_size=32, local_steps=5, lr=0.5, max_grad_norm=1.0),
    num_sites=2,
)
