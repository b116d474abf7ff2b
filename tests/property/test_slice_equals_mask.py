"""Property: for random networks and random removal sets, slice == mask (GLOSSARY.md).

Networks are built from drawn integers (layer kinds, widths, branch choices), never by
filtering, so hypothesis shrinks a failure to a short program of small layers. Every
group gets a removal set drawn by hypothesis (not magnitude-ordered). A keep-everything
plan must reproduce ``model(x)`` bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune

ACTS = (torch.relu, F.gelu, torch.sigmoid, F.silu, torch.tanh)
# FXPRUNE_PROPERTY_EXAMPLES=500 for a deeper hunt (~4 min); the default runs in about a minute.
EXAMPLES = int(os.environ.get("FXPRUNE_PROPERTY_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------------
# The network: a program of steps over a state (kind, channels, spatial/tokens)
# ----------------------------------------------------------------------------------
class Net(nn.Module):
    """Runs ``steps``; step i owns the modules/parameters named ``s{i}_*``."""

    def __init__(self) -> None:
        super().__init__()
        self.mods = nn.ModuleDict()
        self.params = nn.ParameterDict()
        self.steps: list[tuple[str, dict]] = []

    def forward(self, x):
        for i, (kind, args) in enumerate(self.steps):
            x = getattr(self, f"_{kind}")(i, x, **args)
        return x

    def m(self, i: int, name: str) -> nn.Module:
        return self.mods[f"s{i}_{name}"]

    # -- image steps (B, C, H, W) ----------------------------------------------------
    def _conv(self, i, x):
        return self.m(i, "conv")(x)

    def _bn(self, i, x):
        return self.m(i, "bn")(x)

    def _act(self, i, x, k):
        return ACTS[k](x)

    def _res(self, i, x, k):
        return x + self.m(i, "b")(ACTS[k](self.m(i, "a")(x)))

    def _se(self, i, x, spatial):
        pooled = x.mean((2, 3)) if spatial else x
        w = torch.sigmoid(self.m(i, "fc2")(torch.relu(self.m(i, "fc1")(pooled))))
        return x * (w[:, :, None, None] if spatial else w)

    def _cat(self, i, x, dim):
        return torch.cat([self.m(i, "a")(x), self.m(i, "b")(x)], dim)

    def _split(self, i, x, sizes, dim, join):
        p, q = torch.split(x, sizes, dim=dim)
        p, q = self.m(i, "a")(p), self.m(i, "b")(q)
        return p + q if join == "add" else torch.cat([q, p], dim)

    def _pool(self, i, x, k):
        return F.max_pool2d(x, 2) if k == 0 else F.avg_pool2d(x, 2) if k == 1 \
            else F.adaptive_avg_pool2d(x, 1)

    def _glu(self, i, x, dim):
        p, q = x.chunk(2, dim=dim)
        return p * torch.sigmoid(q)

    def _gn(self, i, x):
        return self.m(i, "gn")(x)

    def _shuffle(self, i, x, c):
        b, n, h, w = x.shape
        if c:   # literal sizes
            return x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return x.view(b, 2, n // 2, h, w).transpose(1, 2).reshape(b, n, h, w)

    def _narrow(self, i, x, start):
        return x[:, start:]

    def _to_tokens(self, i, x):
        return x.flatten(2).transpose(1, 2)

    def _flatten(self, i, x):
        return self.m(i, "fc")(torch.flatten(x, 1))

    # -- token steps (B, N, C) ---------------------------------------------------------
    def _linear(self, i, x):
        return self.m(i, "fc")(x)

    def _heads(self, i, x, h, d, k):
        b, n, c = x.shape
        # the head size as a literal, or computed from the (pruned) channel count
        y = x.reshape(b, n, h, d if d else c // h).permute(0, 2, 1, 3)   # B, h, N, d
        y = ACTS[k](y).transpose(1, 2)                            # B, N, h, d
        return y.reshape(b, n, c)

    def _ln(self, i, x):
        return self.m(i, "ln")(x)

    def _mix_tokens(self, i, x):
        return self.m(i, "tok")(x.transpose(1, 2)).transpose(1, 2)

    def _cls(self, i, x):
        cls = self.params[f"s{i}_cls"].expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], 1) + self.params[f"s{i}_pos"]

    def _pool_tokens(self, i, x):
        return x.mean(1)

    def _to_image(self, i, x, hw):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw, hw)

    def _head(self, i, x):
        return self.m(i, "fc")(x)


@dataclass
class State:
    kind: str   # "img" (B, C, H, W) | "tok" (B, N, C) | "vec" (B, C)
    c: int
    hw: int = 0
    n: int = 0
    notes: list = field(default_factory=list)


def _randomize(module: nn.Module) -> None:
    """Non-trivial BN / LN statistics and affine parameters."""
    with torch.no_grad():
        for name, t in module.named_buffers():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5) if "var" in name else t.uniform_(-0.5, 0.5)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)


@st.composite
def networks(draw):
    """(model, example input) for a program of 2..8 drawn steps and a head."""
    width = st.integers(1, 6)
    net = Net()
    start = draw(st.integers(0, 1))
    if start == 0:
        hw = draw(st.integers(1, 2)) * 2
        state, x = State("img", 3, hw=hw), torch.randn(2, 3, hw, hw)
    else:
        state, x = State("tok", 4, n=draw(st.integers(2, 4))), None
        x = torch.randn(2, state.n, 4)

    def add(kind: str, **args) -> int:
        net.steps.append((kind, args))
        return len(net.steps) - 1

    def mod(i: int, name: str, module: nn.Module) -> None:
        _randomize(module)
        net.mods[f"s{i}_{name}"] = module

    for _ in range(draw(st.integers(2, 8))):
        c = state.c
        if state.kind == "img":
            op = draw(st.integers(0, 15))
            if op in (6, 15) and c < 2 or op in (8, 14) and c % 2:
                op = 0        # not applicable: a conv instead (no filtering)
            if op in (0, 11, 12):  # conv: plain, grouped or depthwise
                w, k = draw(width), draw(st.sampled_from([1, 3]))
                g = draw(st.integers(0, 2))
                groups = c if g == 1 and c > 1 else (2 if g == 2 and c % 2 == 0 else 1)
                out = c * draw(st.integers(1, 2)) if groups == c else w * groups
                i = add("conv")
                mod(i, "conv", nn.Conv2d(c, out, k, padding=k // 2, groups=groups))
                state.c = out
            elif op == 1:
                mod(add("bn"), "bn", nn.BatchNorm2d(c))
            elif op == 2:
                add("act", k=draw(st.integers(0, len(ACTS) - 1)))
            elif op == 3:     # residual block
                i = add("res", k=draw(st.integers(0, len(ACTS) - 1)))
                mid = draw(width)
                mod(i, "a", nn.Conv2d(c, mid, 3, padding=1))
                mod(i, "b", nn.Conv2d(mid, c, 1))
            elif op == 4:     # squeeze-excite: x * sigmoid(fc(pool(x)))
                i = add("se", spatial=True)
                mid = draw(width)
                mod(i, "fc1", nn.Linear(c, mid))
                mod(i, "fc2", nn.Linear(mid, c))
            elif op == 5:     # two branches concatenated along channels
                wa, wb = draw(width), draw(width)
                i = add("cat", dim=1)
                mod(i, "a", nn.Conv2d(c, wa, 1))
                mod(i, "b", nn.Conv2d(c, wb, 3, padding=1))
                state.c = wa + wb
            elif op == 6:     # split, a conv per piece, add or cat back
                s = draw(st.integers(1, c - 1))
                join = draw(st.sampled_from(["add", "cat"]))
                wa = draw(width)
                wb = wa if join == "add" else draw(width)
                i = add("split", sizes=[s, c - s], dim=1, join=join)
                mod(i, "a", nn.Conv2d(s, wa, 1))
                mod(i, "b", nn.Conv2d(c - s, wb, 1))
                state.c = wa if join == "add" else wa + wb
            elif op == 7:
                k = draw(st.integers(0, 2)) if state.hw >= 2 else 2
                add("pool", k=k)
                state.hw = state.hw // 2 if k < 2 else 1
            elif op == 8:
                add("glu", dim=1)
                state.c = c // 2
            elif op == 13:    # GroupNorm: a channel mixer (inexact), groups stay equal
                divisors = [d for d in range(1, c + 1) if c % d == 0]
                ng = divisors[draw(st.integers(0, len(divisors) - 1))]
                mod(add("gn"), "gn", nn.GroupNorm(ng, c))
            elif op == 14:    # channel shuffle (2 groups) through view / transpose / reshape
                add("shuffle", c=c if draw(st.booleans()) else 0)
            elif op == 15:    # a slice of the channels goes on
                start = draw(st.integers(1, c - 1))
                add("narrow", start=start)
                state.c = c - start
            elif op == 9:
                add("to_tokens")
                state.kind, state.n = "tok", state.hw * state.hw
            else:
                w = draw(width)
                i = add("flatten")
                mod(i, "fc", nn.Linear(c * state.hw * state.hw, w))
                state.kind, state.c = "vec", w
        elif state.kind == "tok":
            op = draw(st.integers(0, 8))
            if op == 0:
                w = draw(width)
                mod(add("linear"), "fc", nn.Linear(c, w))
                state.c = w
            elif op == 1:     # reshape into heads, permute, act, permute back, merge
                divisors = [h for h in range(1, c + 1) if c % h == 0]
                h = divisors[draw(st.integers(0, len(divisors) - 1))]
                literal = draw(st.booleans())
                add("heads", h=h, d=c // h if literal else 0,
                    k=draw(st.integers(0, len(ACTS) - 1)))
            elif op == 2:
                add("act", k=draw(st.integers(0, len(ACTS) - 1)))
            elif op == 3:     # residual MLP
                i = add("res", k=draw(st.integers(0, len(ACTS) - 1)))
                mid = draw(width)
                mod(i, "a", nn.Linear(c, mid))
                mod(i, "b", nn.Linear(mid, c))
            elif op == 4:
                mod(add("ln"), "ln", nn.LayerNorm(c))
            elif op == 5:     # token mixing through a transpose
                mod(add("mix_tokens"), "tok", nn.Linear(state.n, state.n))
            elif op == 6:     # class token + position embedding
                i = add("cls")
                net.params[f"s{i}_cls"] = nn.Parameter(torch.randn(1, 1, c))
                net.params[f"s{i}_pos"] = nn.Parameter(torch.randn(1, state.n + 1, c))
                state.n += 1
            elif op == 7:
                add("pool_tokens")
                state.kind = "vec"
            elif op == 8:
                side = int(round(state.n ** 0.5))
                if side * side == state.n:
                    add("to_image", hw=side)
                    state.kind, state.hw = "img", side
                else:
                    add("glu", dim=2) if c % 2 == 0 else add("act", k=0)
                    state.c = c // 2 if c % 2 == 0 else c
        else:  # vec (B, C)
            op = draw(st.integers(0, 4))
            if op == 0:
                w = draw(width)
                mod(add("linear"), "fc", nn.Linear(c, w))
                state.c = w
            elif op == 1:
                mod(add("bn"), "bn", nn.BatchNorm1d(c))
            elif op == 2:
                add("act", k=draw(st.integers(0, len(ACTS) - 1)))
            elif op == 3:
                i = add("res", k=draw(st.integers(0, len(ACTS) - 1)))
                mid = draw(width)
                mod(i, "a", nn.Linear(c, mid))
                mod(i, "b", nn.Linear(mid, c))
            else:
                i = add("se", spatial=False)
                mid = draw(width)
                mod(i, "fc1", nn.Linear(c, mid))
                mod(i, "fc2", nn.Linear(mid, c))
    # a head so that the last channel space is consumed (the model output is pinned)
    if state.kind == "img":
        i = add("flatten")
        mod(i, "fc", nn.Linear(state.c * state.hw * state.hw, 3))
    else:
        mod(add("head"), "fc", nn.Linear(state.c, 3))
    return net.eval(), x


def removal_sets(data, analysis):
    """For every group, a drawn set of units to remove (at least one unit stays).

    A set that would empty a whole tensor dim (a cat input, a split piece: refused by
    ``Plan``) gives units back deterministically, so no example is filtered out."""
    remove = {g.id: set(data.draw(st.lists(st.integers(0, g.size - 1), unique=True,
                                           max_size=g.size - 1), label=f"remove {g.name}"))
              for g in analysis.groups}
    return give_back(analysis, remove)


def give_back(analysis, remove: dict[int, set]) -> dict[int, list[int]]:
    """``remove`` (group id -> unit indices) with units given back, smallest first, until
    no tensor dim loses every index (``test_gate_oracle.py`` draws with numpy)."""
    while True:
        gone: dict[tuple[str, int], np.ndarray] = {}
        for g in analysis.groups:
            for m in g.members:
                hit = gone.setdefault((m.fqn, m.dim), np.zeros(len(m.units), dtype=bool))
                hit |= np.isin(m.units, sorted(remove[g.id]))
        empty = [key for key, hit in gone.items() if len(hit) and hit.all()]
        if not empty:
            return {k: sorted(v) for k, v in remove.items()}
        for g in analysis.groups:
            mine = [m for m in g.members if (m.fqn, m.dim) == empty[0] and (m.units >= 0).any()]
            if mine:
                remove[g.id].discard(int(mine[0].units[mine[0].units >= 0].min()))
                break


# ----------------------------------------------------------------------------------
@SETTINGS
@given(net=networks(), data=st.data())
def test_slice_equals_mask_for_random_removals(check_pruned, net, data):
    model, x = net
    a = fxprune.analyze(model, x)
    plan = fxprune.Plan.from_indices(a, removal_sets(data, a), remove=True)
    pruned = check_pruned(model, x, plan)
    checked = {c.group: c.check for c in pruned.report.groups}
    for g in a.groups:
        assert checked[g.name] == ("untouched" if g.name not in plan.keep
                                   else "exact" if g.exact else "shape")


@settings(max_examples=max(EXAMPLES // 2, 1), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks())
def test_keep_everything_reproduces_the_model_exactly(net):
    model, x = net
    a = fxprune.analyze(model, x)
    with torch.no_grad():
        want = model(x)
        for plan in (fxprune.Plan.keep_all(a),
                     fxprune.Plan.from_indices(a, {g.id: range(g.size) for g in a.groups})):
            small = fxprune.compile(model, plan)
            assert torch.equal(small(x), want)
            assert sum(p.numel() for p in small.parameters()) == \
                sum(p.numel() for p in model.parameters())
