"""Capture (fxprune/capture.py): fx tracing with leaves and concrete_args, torch.export,
and errors that name the module, the line and a remedy."""
from __future__ import annotations

import linecache

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.capture import FallbackWarning

X = torch.randn(2, 3, 4, 4)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: neither fx nor export can capture it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:  # data-dependent branch
            return y
        return -y


class ShapeDependent(nn.Module):
    """Control flow on a static shape: fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        if x.shape[1] == 3:
            x = x * 2
        return self.b(torch.relu(self.a(x)))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        if x.shape[1] > 3:      # untraceable by fx: kept whole as a leaf
            return self.c(x)
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.inner = Inner()
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(self.inner(self.a(x)))


def test_fx_trace_records_frontend_and_source_lines():
    gm = fxprune.trace(ShapeDependent(), frontend="export", example_inputs=(X,))
    assert gm.meta["fxprune"]["frontend"] == "export"
    gm = fxprune.trace(Outer(), leaf_modules=(Inner,))
    assert gm.meta["fxprune"]["frontend"] == "fx"
    (a,) = [n for n in gm.graph.nodes if n.name == "a"]
    assert "test_capture.py" in a.meta["stack_trace"]


@pytest.mark.parametrize("leaf", [Inner, "Inner", "inner"])
def test_leaf_modules_by_type_class_name_or_qualname(leaf):
    with pytest.raises(fxprune.TraceError):
        fxprune.trace(Outer(), frontend="fx")
    gm = fxprune.trace(Outer(), leaf_modules=(leaf,), frontend="fx")
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == [("call_module", "a"), ("call_module", "inner"), ("call_module", "b")]
    a = fxprune.analyze(Outer(), X, leaf_modules=(leaf,), frontend="fx")
    assert a.barriers == ("inner",)   # a leaf without a rule is a barrier
    # b's input comes from the barrier and its output is the model output: no group left
    assert a.groups == ()


USER_MODEL = """
class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            return y
        return -y
"""


def define_in_file(source: str, filename: str) -> dict:
    """Define classes as if they came from the user's file ``filename`` (for tracebacks)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"torch": torch, "nn": nn}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def test_untraceable_model_names_module_line_and_remedy():
    UserNet = define_in_file(USER_MODEL, "/home/user/project/user_model.py")["UserNet"]
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(UserNet(), X, frontend="fx")
    text = str(info.value)
    assert "user_model.py:9" in text          # file and line of the branch
    assert "if y.sum() > 0" in text           # the offending line
    assert "UserNet" in text                  # the module
    assert "leaf_modules" in text and "concrete_args" in text and "frontend='export'" in text


def test_untraceable_model_in_a_file_named_like_capture_py():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(DataDependent(), X, frontend="fx")
    assert "test_capture.py" in str(info.value)


def test_auto_falls_back_to_export_and_reports_both_failures():
    a = fxprune.analyze(ShapeDependent(), X)   # frontend="auto"
    assert a.gm.meta["fxprune"]["frontend"] == "export"
    assert [g.size for g in a.groups] == [6]
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(DataDependent(), X, frontend="export")
    assert "torch.export failed" in str(info.value)
    # data-dependent control flow: auto records one path, naming both failures and the line
    with pytest.warns(FallbackWarning, match=r"symbolic tracing failed.*torch\.export failed"
                      r".*specialised.*if y\.sum\(\) > 0:") as rec:
        a = fxprune.analyze(DataDependent(), X)
    assert a.gm.meta["fxprune"]["frontend"] == "record" and rec[0].filename == __file__


def test_export_without_inputs_is_a_trace_error():
    with pytest.raises(fxprune.TraceError, match="needs example_inputs"):
        fxprune.trace(ShapeDependent())


def test_unknown_frontend_is_refused():
    with pytest.raises(ValueError, match="frontend"):
        fxprune.trace(Outer(), frontend="jit")


def test_concrete_args_for_python_flags(check_pruned):
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x, relu: bool = True):
            y = self.a(x)
            if relu:
                y = torch.relu(y)
            return self.b(y)

    model = Flag().eval()
    with pytest.raises(fxprune.TraceError):
        fxprune.trace(model, frontend="fx")
    # the concrete value stays an input, guarded by an assert: pass it along
    a = fxprune.analyze(model, (X, False), concrete_args={"relu": False}, frontend="fx")
    assert not any(n.target is torch.relu for n in a.gm.graph.nodes)
    check_pruned(model, (X, False), fxprune.Plan.from_indices(a, {0: [0, 1]}))
    with pytest.raises(fxprune.ShapePropagationError, match="specialized"):
        fxprune.analyze(model, (X, True), concrete_args={"relu": False}, frontend="fx")


def test_capture_leaves_the_model_untouched(helpers):
    model = ShapeDependent().train()
    before = helpers.snapshot(model)
    fxprune.trace(model, (X,))
    fxprune.analyze(model, X)
    helpers.assert_untouched(model, before)


def test_pre_traced_graph_module_is_analysed_as_is():
    gm = fxprune.trace(Outer(), leaf_modules=(Inner,))
    a = fxprune.analyze(gm, X)
    assert a.gm is gm and a.barriers == ("inner",)
