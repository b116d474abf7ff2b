"""Inspection (fxprune/core/report.py, groups.py): tables, networkx graphs, DOT, provenance."""
from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 4, 3, padding=1)
        self.ln = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8 * 16, 2)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.c2(torch.relu(self.ln(self.c1(y))))
        return self.head(torch.flatten(y, 1))


X = torch.randn(1, 3, 4, 4)


@pytest.fixture(scope="module")
def analysis():
    return fxprune.analyze(Res().eval(), X)


def test_the_fixture_groups(analysis):
    assert [(g.name, g.size, g.exact) for g in analysis.groups] == [
        ("stem.weight[0]", 8, True), ("c1.weight[0]", 2, False)]


def test_table_has_one_row_per_group(analysis):
    text = analysis.table()
    assert isinstance(text, str)
    lines = text.splitlines()
    assert len(lines) == 2 + len(analysis.groups)      # header, rule, one row per group
    assert "units" in lines[0] and "exact" in lines[0]
    for g, row in zip(analysis.groups, lines[2:]):
        assert g.name in row and str(g.size) in row
    assert "yes" in lines[2] and "no" in lines[3]
    assert len(analysis.table(tablefmt="github").splitlines()) == 2 + len(analysis.groups)


def test_table_of_a_model_without_groups():
    a = fxprune.analyze(nn.Sequential(nn.Conv2d(3, 2, 1)), X)
    assert a.groups == ()
    assert len(a.table().splitlines()) <= 2


def test_analysis_graph_links_groups_sharing_a_parameter(analysis):
    g = analysis.to_networkx()
    assert isinstance(g, nx.Graph) and not g.is_directed()
    assert set(g.nodes) == {0, 1}
    # c1 consumes group 0 (columns) and produces group 1 (rows); c2 the other way round
    assert g.has_edge(0, 1)
    assert g.edges[0, 1]["shared"] in {"c1.weight", "c2.weight"}
    assert g.nodes[1]["exact"] is False and g.nodes[0]["size"] == 8


def test_group_graph_has_fx_nodes_and_parameter_slices(analysis):
    grp = analysis.groups[0]
    g = grp.to_networkx()
    assert isinstance(g, nx.DiGraph)
    kinds = nx.get_node_attributes(g, "kind")
    consumers = {n for n, c in nx.get_node_attributes(g, "consumer").items() if c}
    assert {n for n, k in kinds.items() if k == "node"} == set(grp.nodes) | consumers
    assert "head" in consumers  # the head reads the stream: its columns are sliced
    # every slice hangs off the node that uses it: the picture is one connected piece
    assert nx.is_weakly_connected(g)
    assert all(g.out_degree(s) >= 1 for s, k in kinds.items() if k == "slice")
    slices = {n for n, k in kinds.items() if k == "slice"}
    assert slices == {f"{m.fqn}[{m.dim}]" for m in grp.members}
    assert g.nodes["stem.weight[0]"]["role"] == "out"
    assert g.nodes["head.weight[1]"]["index_map"] == "x16 blocks"
    assert g.has_edge("stem", "add") and g.edges["stem", "add"]["kind"] == "data"
    assert g.has_edge("stem.weight[0]", "stem") and g.edges["stem.weight[0]", "stem"]["kind"] == "param"
    assert g.nodes["add"]["coupling"] is True
    assert g.has_edge("head.weight[1]", "head")


def test_dot_text(analysis):
    grp = analysis.groups[1]
    dot = grp.to_dot()
    assert dot.startswith('digraph "c1.weight[0]" {') and dot.rstrip().endswith("}")
    assert "inexact" in dot
    for m in grp.members:
        assert f'"{m.fqn}[{m.dim}]"' in dot
    assert dot.count("{") == dot.count("}")


def test_why_names_birth_merges_and_inexactness(analysis):
    text = analysis.groups[0].why()
    assert "born at: stem.weight[0]" in text and "add" in text.split("coupled by:")[1]
    text = analysis.groups[1].why()
    assert "inexact because" in text and "group norm" in text


def test_member_index_maps_and_indices():
    class Part(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv2d(10, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([torch.relu(self.a(x)), self.b(x)], 1) * 2)

    class Pin(Part):
        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            return self.c(y), y[:, :4]

    (g,) = fxprune.analyze(Part(), X).groups
    by = {(m.fqn, m.dim): m for m in g.members}
    assert by[("a.weight", 0)].index_map == "identity"
    assert by[("c.weight", 1)].index_map == "identity"
    assert by[("b.weight", 0)].units.tolist() == [4, 5, 6, 7, 8, 9]
    assert by[("c.weight", 1)].indices(5).tolist() == [5]
    (g,) = fxprune.analyze(Pin(), X).groups
    c_in = [m for m in g.members if m.fqn == "c.weight"][0]
    assert c_in.index_map == "identity[4:10]"          # a's columns are pinned (-1)
    assert c_in.indices(0).tolist() == [4]
    assert np.array_equal(c_in.units[:4], [-1] * 4)


def test_verify_report_table(check_pruned):
    model = Res().eval()
    a = fxprune.analyze(model, X)
    report = check_pruned(model, X, fxprune.Plan.from_indices(a, {0: [0, 1, 2]})).report
    text = report.table()
    assert text.splitlines()[0].startswith("slice == mask: OK")
    assert "stem.weight[0]" in text and "c1.weight[0]" not in text  # untouched: not listed


def test_group_lookup_by_any_slice_module_or_parameter(analysis):
    stem = analysis.group("stem.weight[0]")
    for key in (0, "stem", "stem.weight", "c2.weight[0]", "c2.bias[0]", "c1.weight[1]",
                "head.weight[1]"):
        assert analysis.group(key) is stem, key
    assert analysis.group("ln.weight[0]") is analysis.group("c1") is analysis.group(1)
    assert analysis.groups_of("c2") == (stem, analysis.group("c1"))  # outputs, inputs
    assert analysis.groups_of("nothing") == ()
    with pytest.raises(KeyError, match="left whole .*pins"):
        analysis.group("head.weight[0]")  # the model output
    with pytest.raises(KeyError, match="did you mean 'stem.weight"):
        analysis.group("stem.wieght[0]")


def test_groups_of_takes_the_slice_key_that_group_refers_to(analysis):
    """group(key) names groups_of(key) when a slice spans several groups: every slice
    key group() takes must list its group there (groups_of returned () for them)."""
    for key in ("stem.weight[0]", "c2.bias[0]", "c1.weight[1]", "head.weight[1]"):
        assert analysis.groups_of(key) == (analysis.group(key),), key
    assert analysis.groups_of("head.weight[0]") == ()  # left whole: the model output
    with pytest.raises(TypeError, match="analysis.group"):
        analysis.groups_of(0)


def test_group_by_a_container_module_that_produces_one_group():
    """timm's ConvNormAct ("stages.0.conv_exp") holds conv and bn: the container's name
    finds the group its conv produces; a container producing several names them."""
    cna = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
    tail = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1))
    model = nn.Sequential(nn.Sequential(cna, tail), nn.AdaptiveAvgPool2d(1)).eval()
    an = fxprune.analyze(model, torch.randn(1, 3, 4, 4))
    assert an.group("0.0") is an.group("0.0.0.weight[0]")
    assert an.group("0.1") is an.group("0.1.0")  # 0.1.2's output is the model's output
    with pytest.raises(KeyError, match=r"module '0' produces 2 groups .*groups_of\('0'\)"):
        an.group("0")
    with pytest.raises(KeyError, match="no group '0.2'"):
        an.group("0.2")


def test_group_keys_are_ints_or_strings(analysis):
    assert analysis.group(np.int64(0)) is analysis.group(0)
    for bad in (True, 3.0, None):
        with pytest.raises(TypeError, match="int id or a str"):
            analysis.group(bad)
