"""Issue 8 item 3: parametrized weights. weight_norm is sliced through its g and v; other
parametrizations and torch.nn.utils.prune hooks are pinned with the remedy, and the rest
of the model still prunes."""
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize, prune

import fxprune

X = torch.randn(2, 3, 6, 6)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def _wrap(kind):
    m = _net()
    if kind == "prune":
        prune.l1_unstructured(m[2], "weight", 0.3)
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(m[2])
    elif kind == "custom":
        parametrize.register_parametrization(m[2], "weight", Doubled())
    elif kind == "orthogonal":
        parametrizations.orthogonal(m[4])
    return m


def _compiles(model, an):
    plan = fxprune.Plan.from_ratio(an, 0.5, criterion="random")
    small = fxprune.compile(model, plan)
    report = fxprune.verify(model, small, plan, (X,))
    assert report.ok
    return plan, small, report


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_norm_slices_g_and_v(dim):
    model = _net()
    parametrizations.weight_norm(model[2], dim=dim)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    an = fxprune.analyze(model, (X,))
    base = "2.parametrizations.weight"
    g = an.group(f"{base}.original1[0]")
    if dim == 0:  # filters: g and v together, exact
        assert g.exact and (f"{base}.original0", 0) in {(m.fqn, m.dim) for m in g.members}
    producer = an.group("0.weight[0]")  # conv 2's input columns: the norm spans them
    assert (producer.exact, producer.inexact_kinds) == ((False, ("statistics",)) if dim == 0
                                                         else (True, ()))
    plan, small, report = _compiles(model, an)
    assert report.params_after < report.params_before
    pm = small.get_submodule("2")
    assert parametrize.is_parametrized(pm, "weight")  # the parametrization still works
    assert pm.weight.shape == (pm.out_channels, pm.in_channels, 3, 3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # untouched


@pytest.mark.parametrize("kind", ["prune", "spectral_norm", "custom", "orthogonal"])
def test_other_parametrizations_are_pinned_with_remedy(kind):
    model = _wrap(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        an = fxprune.analyze(model, (X,))
        pins = an.pins()
        target = "2" if kind != "orthogonal" else "4"
        mine = [p for p in pins if p.fqn.startswith(target + ".")]
        assert mine and all(p.whole for p in mine if p.fqn.endswith(("orig", "original")))
        remedy = "prune.remove" if kind == "prune" else "remove_parametrizations"
        assert any(remedy in p.reason for p in mine)
        # the rest of the model still prunes: the last hidden conv's filters
        free = "4.weight[0]" if kind != "orthogonal" else "0.weight[0]"
        assert free in [g.name for g in an.groups]
        _compiles(model, an)
