"""Tiny models shared by the sparsity tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """conv -> grouped conv -> linear -> head (8 classes); reduction dims divisible by 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, groups=2)
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x)).flatten(1)
        return self.head(F.relu(self.fc(x)))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def cnn_inputs(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def cnn_data(batches: int = 2, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 4, 6, 6, generator=g), torch.randint(0, 8, (n,), generator=g))
            for _ in range(batches)]
