"""Recurrent rules: RNN/GRU/LSTM hidden units are exact, coupled across layers/directions."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune


def _model(cls, bidirectional):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 12)
            self.rnn = cls(12, 16, num_layers=2, batch_first=True, bidirectional=bidirectional)
            self.out = nn.Linear(32 if bidirectional else 16, 3)

        def forward(self, x):
            y, _ = self.rnn(torch.tanh(self.inp(x)))
            return self.out(y)

    return M().eval()


@pytest.mark.parametrize("cls, gates", [(nn.RNN, 1), (nn.GRU, 3), (nn.LSTM, 4)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_hidden_units(cls, gates, bidirectional):
    torch.manual_seed(0)
    model, x = _model(cls, bidirectional), torch.randn(2, 6, 5)
    a = fxprune.analyze(model, (x,))
    hidden = a.group("rnn.weight_ih_l0[0]")
    assert hidden.size == 16 and hidden.exact
    assert hidden.granularity == gates  # one row per gate
    plan = fxprune.Plan.from_indices(a, {hidden.name: range(0, 16, 2), "inp.weight[0]": [1, 4, 7]})
    small = fxprune.compile(model, plan)
    rnn = small.get_submodule("rnn")
    assert (rnn.input_size, rnn.hidden_size) == (3, 8)
    assert rnn.weight_ih_l1.shape == (gates * 8, 8 * (2 if bidirectional else 1))
    assert small.get_submodule("out").weight.shape[1] == 8 * (2 if bidirectional else 1)
    assert fxprune.verify(model, small, plan, (x,)).ok


def test_recurrent_with_initial_state_is_a_barrier():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 12)
            self.rnn = nn.GRU(12, 16, batch_first=True)

        def forward(self, x, h0):
            return self.rnn(self.inp(x), h0)[0]

    a = fxprune.analyze(M().eval(), (torch.randn(2, 6, 5), torch.zeros(1, 2, 16)))
    assert not any(m.fqn.startswith("rnn") for g in a.groups for m in g.members)
    assert not any(m.fqn == "inp.weight" and m.dim == 0 for g in a.groups for m in g.members)
