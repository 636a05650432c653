"""A small DP-friendly CNN for MNIST: GroupNorm instead of BatchNorm.

BatchNorm mixes examples of a batch, so per-example gradients (and DP-SGD, Abadi et al. 2016)
are undefined for it; GroupNorm (Wu & He, "Group Normalization", ECCV 2018) normalizes each
example alone and is what Opacus recommends. Small on purpose (about 26k parameters): DP-SGD
favours small models (Tramer & Boneh, "Differentially Private Learning Needs Better Features",
ICLR 2021), and it keeps 100 simulated sites runnable on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class MnistCNN(nn.Module):
    """conv 16 -> GroupNorm -> pool -> conv 32 -> GroupNorm -> pool 4x4 -> fc 40 -> fc 10.

    Parameters
    ----------
    groups
        Number of GroupNorm groups (divides 16 and 32).
    """

    def __init__(self, groups: int = 4) -> None:
        super().__init__()
        if 16 % groups or 32 % groups:
            raise ValueError(f"groups must divide 16 and 32, got {groups}")
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.norm1 = nn.GroupNorm(groups, 16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(groups, 32)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(32 * 4 * 4, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(batch, 10)`` for images ``(batch, 1, 28, 28)``."""
        x = torch.max_pool2d(torch.relu(self.norm1(self.conv1(x))), 2)
        x = self.pool(torch.relu(self.norm2(self.conv2(x))))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)
