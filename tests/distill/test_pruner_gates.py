"""The Pruner's student agrees with the compiled model, or the Pruner says which group does
not: fused qkv heads, groups left whole (channel mixers), finish naming a broken gate."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.distill import Pruner
from tests.property.test_gate_oracle import FusedBlock


class StemBlock(nn.Module):
    """A stem Linear feeds a pre-norm residual stream: that group is inexact (LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Linear(6, 16), FusedBlock()

    def forward(self, x):
        return self.block(self.stem(x))


def _train(pruner, x, steps):
    opt = torch.optim.SGD(pruner.student.parameters(), lr=0.01)
    for _ in range(steps):
        loss = pruner.student(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


def _units(pruner, name):
    return pruner.analysis.group_of == pruner.analysis.group(name).id


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_fused_qkv_student_equals_the_compiled_model(frontend):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    p = Pruner(FusedBlock(), (x,), target_params=0.6, interval=1, steps=2, criterion="l1",
               frontend=frontend)
    _train(p, x, 2)
    assert not p.mask[_units(p, "attn.qkv.weight[0]")].all()  # head_dim units removed
    result = p.finish(torch.randn(2, 5, 16))
    assert result.report.ok and result.student_max_err < 1e-5


def test_inexact_groups_are_left_whole_with_a_warning():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    with pytest.warns(UserWarning, match=r"leaves 1 group\(s\) whole: \['stem.weight\[0\]'\]"):
        p = Pruner(StemBlock(), (x,), target_params=0.7, interval=1, steps=2, criterion="l1")
    assert not p.analysis.group("stem.weight[0]").exact
    _train(p, x, 2)
    assert p.mask[_units(p, "stem.weight[0]")].all()
    assert not p.mask.all()
    assert p.finish().student_max_err < 1e-5


def test_finish_names_the_group_whose_gates_disagree():
    """An edge left ungated (its gate index set to "not gated") is found and named."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    p = Pruner(FusedBlock(), (x,), target_params=0.6, interval=1, steps=2, criterion="l1")
    _train(p, x, 2)
    qkv = np.flatnonzero(_units(p, "attn.qkv.weight[0]"))
    n = p.analysis.num_units
    broken = 0
    with torch.no_grad():
        for name, index in p.student.gm.named_buffers():
            if name.startswith("_fxprune_gate_index_") and np.isin(index.numpy(), qkv).any():
                index.fill_(n)
                broken += 1
    assert broken
    with pytest.raises(fxprune.VerificationError, match=r"attn\.qkv\.weight\[0\]"):
        p.finish()
