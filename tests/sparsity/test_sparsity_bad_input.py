"""Every bad request raises a typed error that names the layer and the remedy."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.errors import (ImportanceError, PatternError, SharedWeightError, SparsityError)

from _sparse_models import cnn_data, cnn_inputs, small_cnn


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval(bad):
    with pytest.raises(SparsityError, match=r"in \[0, 1\)"):
        fxprune.sparsify(small_cnn(), cnn_inputs(), bad)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4", "2-4", "a:b"])
def test_bad_nm(pattern):
    with pytest.raises(PatternError, match="N:M|0 < N < M"):
        fxprune.sparsify(small_cnn(), cnn_inputs(), pattern=pattern)


def test_m_not_dividing_reduction_dim_names_layer():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(PatternError, match=r"'0.weight'.*6 weights.*M=4.*ignore"):
        fxprune.sparsify(model, torch.randn(2, 6), pattern="2:4", kinds=("linear", "head"))
    sparse, plan = fxprune.sparsify(model, torch.randn(2, 6), pattern="2:4",
                                    kinds=("linear", "head"), ignore=["0.weight"])
    assert set(plan.masks) == {"2.weight"}


def test_sparsity_contradicting_pattern():
    with pytest.raises(SparsityError, match="zeroes exactly 0.5"):
        fxprune.sparsify(small_cnn(), cnn_inputs(), 0.3, pattern="2:4")


@pytest.mark.parametrize("criterion", ["taylor", "fisher", "obd", "wanda"])
def test_data_driven_without_data(criterion):
    with pytest.raises(ImportanceError, match="data-driven: pass data="):
        fxprune.sparsify(small_cnn(), cnn_inputs(), criterion=criterion)


def test_gradient_criterion_without_loss():
    with pytest.raises(ImportanceError, match="loss_fn"):
        fxprune.sparsify(small_cnn(), cnn_inputs(), criterion="taylor", data=cnn_data())


def test_unknown_criterion_and_scope():
    with pytest.raises(ImportanceError, match="unknown criterion 'magnitud'.*wanda"):
        fxprune.sparsify(small_cnn(), cnn_inputs(), criterion="magnitud")
    with pytest.raises(SparsityError, match="scope"):
        fxprune.sparsify(small_cnn(), cnn_inputs(), scope="model")
    with pytest.raises(SparsityError, match="unknown weight kinds"):
        fxprune.sparsify(small_cnn(), cnn_inputs(), kinds=("lstm",))


def test_non_float_weight():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(SparsityError, match=r"'0.weight' has dtype torch.int32"):
        fxprune.sparsify(model, torch.randn(1, 4), kinds=("linear", "head"))


def test_shared_weight_cannot_follow_one_mask():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).sum(-1)

    with pytest.raises(SharedWeightError, match=r"shared as \['a.weight', 'b.weight'\].*untie"):
        fxprune.sparsify(Tied(), torch.randn(2, 8))



def test_nothing_selected():
    model = nn.Sequential(nn.Linear(4, 2))  # only a head
    with pytest.raises(SparsityError, match="no weight selected"):
        fxprune.sparsify(model, torch.randn(1, 4))


def test_gradual_with_data_criterion_and_bad_schedule():
    with pytest.raises(SparsityError, match="needs data"):
        fxprune.GradualPruner(small_cnn(), cnn_inputs(), 0.5, begin=0, end=10, criterion="wanda")
    with pytest.raises(SparsityError, match="end > begin"):
        fxprune.cubic_sparsity(3, 0.5, begin=5, end=5)
    with pytest.raises(SparsityError, match=r"in \[0, 1\)"):
        fxprune.cubic_sparsity(3, 1.0, begin=0, end=5)
