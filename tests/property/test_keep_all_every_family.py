"""Property (issue 8 item 13): for one model per rule family, with ops that fxprune prunes
and ops it pins, a keep-all plan compiles and reproduces the model exactly, and a random
plan over the groups that remain compiles with slice == mask. A pinned op never stops
the rest of the model from pruning and compiling.

Every family file under passes/rules/ must have a case here (so a new family gets one).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


class Sandwich(nn.Module):
    """pre -> relu -> mid -> op -> post (convs, or linears on tokens): pre's channels are
    prunable whatever the op does to mid's."""

    def __init__(self, op, make, c=8, tokens=False) -> None:
        super().__init__()
        self.op, self.tokens = op, tokens
        self.pre = nn.Linear(3, c) if tokens else nn.Conv2d(3, c, 1)
        self.mid = nn.Linear(c, c) if tokens else nn.Conv2d(c, c, 1)
        self.inner = make()
        out = self.inner_out(c)
        self.post = nn.Linear(out, 2) if tokens else nn.Conv2d(out, 2, 1)

    def inner_out(self, c):
        with torch.no_grad():
            x = torch.zeros(2, 5, c) if self.tokens else torch.zeros(2, c, 6, 6)
            return self.op(self, x).shape[-1 if self.tokens else 1]

    def forward(self, x):
        return self.post(self.op(self, self.mid(torch.relu(self.pre(x)))))


def _none():
    return nn.Identity()


CASES = {
    # family: [(name, op, make_inner, tokens)]
    "conv": [
        ("grouped_transposed", lambda m, y: m.inner(y),
         lambda: nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2, bias=False), False),
        ("depthwise", lambda m, y: m.inner(y), lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
         False),
    ],
    "linear": [("einsum", lambda m, y: torch.einsum("bnc,bmc->bnm", y, y), _none, True)],
    "elementwise": [("glu", lambda m, y: F.glu(y, 1), _none, False),
                    ("prelu", lambda m, y: m.inner(y), lambda: nn.PReLU(8), False)],
    "norm": [("group_norm", lambda m, y: m.inner(y), lambda: nn.GroupNorm(2, 8), False),
             ("layer_norm", lambda m, y: m.inner(y), lambda: nn.LayerNorm(8), True)],
    "shape": [("flatten_cat", lambda m, y: torch.cat([y, y.flip(1)], 1), _none, False),
              ("fft_barrier", lambda m, y: torch.fft.fft(y, dim=1).real, _none, False)],
    "reduce": [("softmax", lambda m, y: y.softmax(1), _none, False),
               ("cumsum_barrier", lambda m, y: y.cumsum(1), _none, False)],
    "pool": [("maxpool", lambda m, y: F.max_pool2d(y, 2), _none, False),
             ("pixel_shuffle", lambda m, y: F.pixel_shuffle(y, 2), _none, False)],
    "attention": [("sdpa", lambda m, y: F.scaled_dot_product_attention(y, y, y), _none, True),
                  ("mha", lambda m, y: m.inner(y, y, y)[0],
                   lambda: nn.MultiheadAttention(8, 2, batch_first=True), True)],
    "recurrent": [("gru", lambda m, y: m.inner(y)[0],
                   lambda: nn.GRU(8, 4, batch_first=True), True)],
    "aten": [("slice", lambda m, y: y[:, 2:], _none, False)],
    "vision": [("roi_free_interp", lambda m, y: F.interpolate(y, scale_factor=2), _none, False)],
    "timm": [("timm_free", lambda m, y: F.hardswish(y), _none, False)],
    "dims": [("unflatten", lambda m, y: y.flatten(2).unflatten(2, (6, 6)), _none, False)],
    "parametrized": [
        ("weight_norm", lambda m, y: m.inner(y),
         lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1)), False),
        ("spectral_norm_pinned", lambda m, y: m.inner(y),
         lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8)), True),
    ],
}
HELPERS = {"__init__", "registry", "meta"}  # modules of passes/rules/ that hold no rules
FLAT = [(family, *case) for family, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("family,name,op,make,tokens", FLAT, ids=[f"{f}-{n}" for f, n, *_ in FLAT])
def test_keep_all_reproduces_and_the_rest_prunes(check_pruned, family, name, op, make, tokens):
    model = Sandwich(op, make, tokens=tokens).eval()
    x = torch.randn(2, 5, 3) if tokens else torch.randn(2, 3, 6, 6)
    analysis = fxprune.analyze(model, (x,))
    small = fxprune.compile(model, fxprune.Plan.keep_all(analysis))
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)
    assert any(m.fqn == "pre.weight" for g in analysis.groups for m in g.members), \
        "the layers before the op stay prunable"
    check_pruned(model, x, fxprune.Plan.from_ratio(analysis, 0.5, criterion="random", seed=0))


def test_every_rule_family_has_a_case():
    root = Path(__file__).resolve().parents[2] / "passes" / "rules"
    families = {p.stem for p in root.glob("*.py") if p.stem not in HELPERS}
    assert families <= set(CASES), f"add a keep-all case for {sorted(families - set(CASES))}"
    for helper in HELPERS - {"registry"}:
        assert "@rule(" not in (root / f"{helper}.py").read_text(), f"{helper} holds rules"
