"""Issue 8 item 12: every spelling of a call (positional, keyword, keyword-only, numpy
aliases ``axis``/``keepdims``/``input=``) reaches rules and fixups as the same value,
because calls are normalised once (``passes.rules.registry.normalized_call``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from passes.rules.registry import normalized_call


def _remove_one(analysis):
    return fxprune.Plan.from_indices(analysis, {g.id: [1] for g in analysis.groups
                                                if g.size > 1}, remove=True)


class Softmaxed(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.p1, self.p2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, h):
        y = torch.relu(self.p1(h))
        y = {"method_axis": lambda: y.softmax(axis=1),
             "method_dim": lambda: y.softmax(dim=1),
             "function_axis": lambda: torch.softmax(y, axis=1),
             "function_input": lambda: torch.softmax(input=y, dim=-1),
             "log_softmax_axis": lambda: y.log_softmax(axis=-1)}[self.spelling]()
        return self.p2(y)


@pytest.mark.parametrize("spelling", ["method_axis", "method_dim", "function_axis",
                                      "function_input", "log_softmax_axis"])
def test_softmax_dim_in_every_spelling_is_a_channel_mixer(spelling):
    model = Softmaxed(spelling).eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 4),))
    (group,) = analysis.groups
    assert not group.exact, "softmax over the pruned dim must make the group inexact"


class Reduced(nn.Module):
    """mean over the channel dim with numpy spellings: inexact, keepdims honoured."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = self.a(x)
        return self.b(y - y.mean(axis=-1, keepdims=True))


def test_reduction_axis_and_keepdims_aliases():
    analysis = fxprune.analyze(Reduced().eval(), (torch.randn(2, 4),))
    (group,) = analysis.groups
    assert not group.exact


class Concatenated(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(9, 2, 1)

    def forward(self, x):
        parts = (self.a(x), self.b(x))
        y = {"axis": lambda: torch.cat(parts, axis=1),
             "keywords": lambda: torch.cat(tensors=parts, dim=1),
             "concat_axis": lambda: torch.concat(parts, axis=-3)}[self.spelling]()
        return self.c(y)


@pytest.mark.parametrize("spelling", ["axis", "keywords", "concat_axis"])
def test_cat_axis_alias_is_the_channel_dim(check_pruned, spelling):
    model = Concatenated(spelling).eval()
    x = torch.randn(2, 3, 5, 5)
    analysis = fxprune.analyze(model, (x,))
    assert [g.size for g in analysis.groups] == [9]
    assert all(g.exact for g in analysis.groups)
    check_pruned(model, x, _remove_one(analysis))


class Chunked(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 3)

    def forward(self, x):
        y = self.a(x)
        u, v = {"chunk_keywords": lambda: torch.chunk(input=y, chunks=2, dim=-1),
                "chunk_method_kw": lambda: y.chunk(chunks=2, dim=-1),
                "split_keywords": lambda: torch.split(y, split_size_or_sections=4, dim=-1),
                "split_method_kw": lambda: y.split(4, dim=1)}[self.spelling]()
        return self.b(u * torch.sigmoid(v))


@pytest.mark.parametrize("spelling", ["chunk_keywords", "chunk_method_kw", "split_keywords",
                                      "split_method_kw"])
def test_split_with_keyword_arguments_compiles(check_pruned, spelling):
    model = Chunked(spelling).eval()
    x = torch.randn(2, 4)
    analysis = fxprune.analyze(model, (x,))
    (group,) = analysis.groups
    assert group.size == 4
    check_pruned(model, x, _remove_one(analysis))


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.transpose(self.a(x), dim1=1, dim0=2))


def test_transpose_keywords_in_any_order(check_pruned):
    model = Transposed().eval()
    x = torch.randn(2, 3, 5)
    analysis = fxprune.analyze(model, (x,))
    (group,) = analysis.groups
    check_pruned(model, x, _remove_one(analysis))


def test_normalized_call_resolves_aliases_and_positions():
    gm = torch.fx.symbolic_trace(Softmaxed("method_axis"))
    (node,) = [n for n in gm.graph.nodes if n.target == "softmax"]
    call = normalized_call(node, gm)
    assert call.get(1, "dim") == 1
    gm = torch.fx.symbolic_trace(Chunked("chunk_keywords"))
    (node,) = [n for n in gm.graph.nodes if n.target is torch.chunk]
    call = normalized_call(node, gm)
    assert call.get(2, "dim") == -1 and call.get(1, "chunks") == 2
