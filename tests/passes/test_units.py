"""Unit tests of the unit model: UnitStore (passes/units.py), the dims helpers
(passes/rules/dims.py) and target canonicalisation (op_key / canonical_name)."""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from passes.rules import dims as D
from passes.rules.registry import canonical_name, op_key
from passes.units import UnitStore


def test_fresh_ids_are_consecutive_and_each_batch_is_a_space():
    s = UnitStore()
    a, b = s.fresh(3, "a"), s.fresh(2, "b")
    assert a.tolist() == [0, 1, 2] and b.tolist() == [3, 4]
    assert s.space_of == [0, 0, 0, 1, 1] and s.space_origin == ["a", "b"]


def test_union_arrays_merges_elementwise_and_merges_spaces():
    s = UnitStore()
    a, b = s.fresh(3, "a"), s.fresh(3, "b")
    s.union_arrays(a, b, "add")
    roots = s.roots()
    assert [roots[i] == roots[j] for i, j in zip(a, b)] == [True] * 3
    assert len({roots[i] for i in a}) == 3  # still three units
    assert s.find_space(1) == s.find_space(0) and s.merged_by  # one space, with a reason


def test_union_arrays_broadcasts():
    s = UnitStore()
    a, b = s.fresh(1, "a"), s.fresh(4, "b")
    s.union_arrays(a, b, "broadcast")
    assert len(set(s.roots().tolist())) == 1


def test_pin_spreads_through_later_unions_with_its_reason():
    s = UnitStore()
    a, b = s.fresh(2, "a"), s.fresh(2, "b")
    s.pin(a[:1], "model output")
    s.union_arrays(a, b, "add")
    assert s.pinned[s.find(int(b[0]))] and not s.pinned[s.find(int(b[1]))]
    assert s.pin_reasons[s.find_space(1)] == ["model output"]


def test_union_along_keeps_one_axis():
    s = UnitStore()
    arr = s.fresh(6, "heads").reshape(2, 3)
    kept = s.union_along(arr, 0, "head split")
    roots = s.roots()
    assert kept.tolist() == [0, 3]
    assert len({roots[u] for u in arr[0]}) == 1 and roots[0] != roots[3]


def test_mark_inexact_flags_the_space():
    s = UnitStore()
    a = s.fresh(2, "a")
    s.mark_inexact(a, "layer norm")
    assert s.inexact == {0: ["layer norm"]}


def test_dims_shift_and_permute():
    u, v = np.arange(3), np.arange(3, 7)
    assert D.shift({0: u}, 2) == {2: u}
    out = D.permute({1: u, 2: v}, [0, 2, 1])  # out axis 1 <- in axis 2
    assert out[1] is v and out[2] is u


def test_dims_reshape_groups_pairs_equal_products():
    assert D.reshape_groups((2, 3, 4), (6, 4)) == [([0, 1], [0]), ([2], [1])]
    assert D.reshape_groups((8, 6), (2, 4, 6)) == [([0], [0, 1]), ([1], [2])]


def test_canonical_name():
    assert canonical_name("relu_") == "relu"
    assert canonical_name("iadd") == "add"
    assert canonical_name("aten::conv2d") == "conv"
    assert canonical_name("aten::convolution") == "convolution"  # its own entry
    assert canonical_name("conv_transpose2d") == "conv_transpose"
    assert canonical_name("_unsafe_view") == "view"
    assert canonical_name("__getitem__") == "getitem"


def test_op_key_of_functions_methods_and_aten():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    cases = {F.relu: "relu", torch.relu: "relu", operator.add: "add", operator.getitem:
             "getitem", torch.ops.aten.relu.default: "relu", torch.ops.aten.add.Tensor: "add"}
    for target, key in cases.items():
        assert op_key(g.call_function(target, (x,))) == key, target
    assert op_key(g.call_method("add_", (x, x))) == "add"

    def user_fn(t):
        return t

    assert op_key(g.call_function(user_fn, (x,))) is user_fn  # a user callable is its own key


def _random_unions(seed: int, fast: bool) -> UnitStore:
    """Random fresh batches, pins and unions (many of them into untouched fresh runs, the
    case ``_union_into_fresh`` takes); ``fast=False`` forces the general loop."""
    rng = np.random.default_rng(seed)
    s = UnitStore()
    if not fast:
        s._union_into_fresh = lambda a, b, why: False
    batches = [s.fresh(int(rng.integers(2, 6)), f"b{i}") for i in range(4)]
    for step in range(40):
        old = batches[int(rng.integers(len(batches)))]
        a = rng.permutation(old)[: int(rng.integers(2, len(old) + 1))]
        if rng.random() < 0.2:
            s.pin(a[:1], f"pin{step}")
        if rng.random() < 0.6:  # a fresh run meets existing channels (dependents, columns)
            b = s.fresh(len(a), f"f{step}")
            batches.append(b)
        else:
            b = batches[int(rng.integers(len(batches)))][: len(a)]
            a = a[: len(b)]
        s.union_arrays(a, b, f"u{step}")
    return s


def test_union_into_fresh_equals_the_general_loop():
    for seed in range(30):
        fast, ref = _random_unions(seed, True), _random_unions(seed, False)
        assert fast.roots().tolist() == ref.roots().tolist()
        assert [fast.pinned[r] for r in fast.roots()] == [ref.pinned[r] for r in ref.roots()]
        assert fast.space_roots().tolist() == ref.space_roots().tolist()
        assert fast.merged_by == ref.merged_by and fast.pin_reasons == ref.pin_reasons


def test_union_into_fresh_is_taken_for_a_fresh_run():
    s = UnitStore()
    a, b = s.fresh(4, "conv"), s.fresh(4, "bn.weight")
    s.union_arrays(a, a, "noop")
    assert s._union_into_fresh(a[::-1].copy(), b, "bn") is True
    assert s.roots()[b].tolist() == a[::-1].tolist() and s.find_space(1) == 0
    assert s._union_into_fresh(b, a, "older run") is False  # a's ids are not newer
