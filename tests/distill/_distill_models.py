"""Tiny models for the distill tests, and loading a benchmark script as a module."""
import importlib.util
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResNetlet(nn.Module):
    """conv-BN-ReLU, a residual conv block, dropout, linear head (10 classes)."""

    def __init__(self, width: int = 8, classes: int = 10, bn: bool = True, p: float = 0.2):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.c1, self.b1 = nn.Conv2d(1, width, 3, padding=1), norm(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1), norm(width)
        self.c3, self.b3 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), norm(2 * width)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = h + F.relu(self.b2(self.c2(h)))
        h = F.relu(self.b3(self.c3(h)))
        return self.fc(self.drop(h.mean((2, 3))))


def batches(n: int = 4, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a fresh module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
