"""Tiny models for the CLI tests, loaded as ``_cli_models:FACTORY`` (module.path:factory)."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """conv-bn-relu-conv-bn + identity: the residual add couples the block's output
    channels with its input's."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + y)


class TinyResNet(nn.Module):
    def __init__(self, c: int = 8, blocks: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


def tiny_resnet() -> nn.Module:
    return TinyResNet()


def tiny_resnet_with_inputs() -> tuple[nn.Module, torch.Tensor]:
    """A factory may return (model, example_inputs)."""
    return TinyResNet(c=6), torch.randn(2, 3, 12, 12)


def broken_factory() -> nn.Module:
    raise RuntimeError("this factory always fails")


not_a_model = 42


def one_block() -> nn.Module:
    """The model behind docs/group.svg: stem, one residual block, head."""
    return TinyResNet(c=8, blocks=1)


class TinyAttention(nn.Module):
    """q/k/v projections and SDPA with its default scale: head_dim is prunable."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (lin(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, c))


def tiny_attention() -> tuple[nn.Module, torch.Tensor]:
    return TinyAttention(), torch.randn(2, 5, 8)


class TinyText(nn.Module):
    """Token ids, an optional mask and optional token types: keyword inputs for the CLI."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.emb, self.types = nn.Embedding(vocab, dim), nn.Embedding(2, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(input_ids)
        if token_type_ids is not None:
            x = x + self.types(token_type_ids)
        if attention_mask is not None:
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        return self.fc2(torch.relu(self.fc1(x))).mean(1)


def tiny_text() -> nn.Module:
    return TinyText()


class Branchy(nn.Module):
    """Data-dependent control flow: ``if x.sum() > 0`` picks one of two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = self.a(h) if x.sum() > 0 else self.b(h)
        return self.head(torch.relu(h).mean((2, 3)))


def branchy() -> nn.Module:
    return Branchy().eval()
